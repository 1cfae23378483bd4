//! The named steps [`run`] loops over: a session made and entered in the
//! client table; the next event waited for while replies are written (input,
//! the client gone, the drain, a lost connection, a spare's time up); what
//! that event means for the loop; the limit on bytes read and not taken; and
//! the end (replies still owed written, connections given back, the client
//! closed).

use super::*;
use crate::downstream::replies::ClientIo;
use std::pin::Pin;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// What woke the session.
pub(super) enum Event {
    Read(usize),
    /// End of input, a dead client connection, or a drain: stop reading.
    Closed,
    /// The pinned connection holding this client's state was lost.
    Lost,
    /// The spare pinned connection's time is up.
    SpareDue,
}

/// What the loop does after an event.
pub(super) enum Turn {
    /// Take the commands read.
    Commands,
    /// Nothing new to take: wait for the next event.
    Wait,
    /// Stop reading and end the session.
    End,
}

/// The drain (or CLIENT KILL) as the event loop watches it: polled once to
/// register for it, then only once it fired (a cheaper check than polling
/// its notifier at every wake-up).
pub(super) struct Drain<'a> {
    token: CancellationToken,
    fired: Pin<&'a mut WaitForCancellationFutureOwned>,
    registered: bool,
}

impl<'a> Drain<'a> {
    /// `fired` is `token.cancelled_owned()`, pinned by the caller (on its
    /// stack: registered once, kept across the loop's turns).
    pub(super) fn new(
        token: CancellationToken,
        fired: Pin<&'a mut WaitForCancellationFutureOwned>,
    ) -> Self {
        Drain {
            token,
            fired,
            registered: false,
        }
    }

    fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.registered && !self.token.is_cancelled() {
            return false;
        }
        self.registered = true;
        self.fired.as_mut().poll(cx).is_ready()
    }
}

impl Session {
    /// A new client's session, entered in the client table (CLIENT LIST,
    /// KILL). `stop` ends it: the drain's child, also cancelled by CLIENT
    /// KILL.
    pub(super) fn new(
        io: Box<dyn ClientIo>,
        peer: Peer,
        local_addr: Option<std::net::SocketAddr>,
        ctx: Arc<Context>,
        stop: CancellationToken,
    ) -> Session {
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        // CLIENT KILL ends the session as a drain does (`stop`) and ends a
        // blocked wait at once (`kill`, its own).
        let kill = CancellationToken::new();
        let reg = ctx
            .clients
            .register(id, peer, ctx.laddr.clone(), kill.clone(), stop);
        Session {
            ctx: ctx.clone(),
            client: Client {
                io,
                owed: VecDeque::new(),
                waits: 0,
                owns: 0,
                reply_size: 0,
                out: WriteQueue::new(COPY_BELOW),
                max_out: ctx.max_buffered_bytes,
                max_push: ctx.max_push_bytes,
                owed_replies: 0,
                push: None,
                marked: 0,
                push_held: false,
                hub: None,
                inbox: BytesMut::new(),
                gone: false,
                killed: false,
                metrics: ctx.metrics.clone(),
                drivers: Vec::new(),
            },
            push_tx: None,
            st: State {
                id,
                proto: Proto::Resp2,
                authed: ctx.password.read().expect("not poisoned").is_none(),
                name: None,
                db: 0,
                in_multi: false,
                watching: false,
                sticky: false,
                subs: 0,
                shard_subs: 0,
                names: publish::Names::default(),
                link: None,
                hub_seq: 0,
                pinned: None,
                spare: None,
                shared: None,
                shared_plain: false,
                last_target: Target::Shared,
                last_conn: None,
                reply_mode: ReplyMode::On,
                tx: Tx::default(),
                redirect_lost: None,
            },
            silent: false,
            op: ops::OTHER,
            batch_op: None,
            census: Vec::new(),
            peer,
            local_addr,
            reg,
            kill,
        }
    }

    /// Write what has arrived; read into `buf` when the client may send
    /// more; return what woke the session.
    ///
    /// # Cancel safety
    /// Awaited to completion once per turn, not raced. The futures it
    /// builds (the lost connections', the spare's timer) are made anew each
    /// turn, since the pinned connection may change between turns; the
    /// drain's is the caller's, registered once.
    pub(super) async fn next_event(&mut self, buf: &mut BytesMut, drain: &mut Drain<'_>) -> Event {
        // The connections holding the client's state: its pinned one, and
        // the hub's when its tracking is redirected there.
        let held = [
            self.st.pinned.as_ref().map(|p| p.lost.clone()),
            self.st.redirect_lost.clone(),
        ];
        let mut lost = pin!(async move {
            let [a, b] = held;
            let gone = |t: Option<CancellationToken>| async move {
                match t {
                    Some(l) => l.cancelled_owned().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = gone(a) => {}
                _ = gone(b) => {}
            }
        });
        // A spare pinned connection goes back to the pool when its time is up.
        let mut spare_due = pin!(self
            .st
            .spare
            .as_ref()
            .map(|s| tokio::time::sleep_until(s.until)));
        let client = &mut self.client;
        poll_fn(|cx| {
            client.poll_out(cx);
            if client.gone {
                return Poll::Ready(Event::Closed);
            }
            if let Some(due) = spare_due.as_mut().as_pin_mut() {
                if due.poll(cx).is_ready() {
                    return Poll::Ready(Event::SpareDue);
                }
            }
            if drain.poll_fired(cx) {
                return Poll::Ready(Event::Closed);
            }
            if lost.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Lost);
            }
            if !client.may_read() {
                return Poll::Pending;
            }
            resp::reserve_for_read(buf);
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut client.io), cx, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Closed),
                Poll::Ready(Ok(n)) => Poll::Ready(Event::Read(n)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// What an event means for the loop.
    pub(super) fn on_event(&mut self, event: Event) -> Turn {
        match event {
            Event::Read(n) => {
                self.ctx.metrics.bytes_in.inc_by(n as u64);
                Turn::Commands
            }
            Event::Closed => Turn::End,
            Event::SpareDue => {
                self.release_spare();
                Turn::Wait
            }
            // Issue 18: kept when what it had there can be answered
            // clearly (an aborted MULTI, a failed WATCH); see session/lost.rs.
            Event::Lost if self.pinned_lost() => Turn::Commands,
            Event::Lost => {
                // Its transaction, database or client mode went with the
                // connection: close, as a direct Redis connection would be, so
                // the client notices and reconnects. Commands in flight on it
                // already got their error replies.
                warn!(peer = %self.peer, id = self.st.id, "closing client: the upstream connection holding its state was lost");
                Turn::End
            }
        }
    }

    /// Whether the bytes read and not taken (an incomplete command) pass
    /// `limits.max_buffered_bytes`: then the client is told so, and closed.
    pub(super) async fn over_limit(&mut self, buf: &BytesMut) -> bool {
        if buf.len() <= self.ctx.max_buffered_bytes {
            return false;
        }
        self.protocol_error(ScanError::Limit {
            what: "bytes buffered for one client",
            limit: self.ctx.max_buffered_bytes,
            key: "limits.max_buffered_bytes",
        })
        .await;
        true
    }

    /// End the session: no further command is read; the replies of those
    /// already read are written and connections go back. False: close the
    /// client at once, without writing.
    pub(super) async fn finish(&mut self) -> bool {
        debug!(peer = %self.peer, id = self.st.id, "client session ended");
        self.release_spare();
        let named = self
            .reg
            .entry
            .redirect_target
            .load(std::sync::atomic::Ordering::Acquire);
        if self.st.link.is_some() || named {
            self.ctx.hub.gone(self.st.id);
        }
        if self.client.killed {
            // The hub dropped this subscriber for not reading its messages (it
            // logged why): close without writing what is queued.
            return false;
        }
        // Write the replies still owed (each arrives or fails), then close.
        self.settle(true).await;
        // A dedicated connection with nothing of the client's on it (it left
        // after EXEC) goes back warm without RESET, as a spare does.
        if !self.st.needs_pin() {
            self.st.spare = self.st.pinned.take().map(|pinned| Spare {
                pinned,
                proto: self.st.proto,
                until: Instant::now(),
            });
            self.release_spare();
        }
        true
    }
}
