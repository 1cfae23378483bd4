//! The connection's state machine and its loop: takes requests, writes
//! them, matches replies FIFO, re-AUTHs, keeps alive, follows the
//! maintenance signal, and on loss says what may be sent again. The entry
//! points and the types its owners use are in [`super`].

use super::*;
use crate::upstream::maintenance::retry::{self, InFlight};

enum Sink {
    Client(Option<ReplyTx>),
    /// The proxy's own re-AUTH with this generation's credential.
    Auth {
        generation: u64,
        expires_at: Option<SystemTime>,
    },
    /// A keepalive PING: the reply is dropped.
    Ping,
}

struct Inflight {
    /// The request's bytes while it may be sent again if the connection
    /// drops (see [`run_shared`]).
    resend: Option<Bytes>,
    count: usize,
    /// Confirmation push frames still owed (see [`Request::pushes`]).
    pushes: usize,
    sink: Sink,
    written_at: Instant,
}

pub(super) async fn run_inner<S: AsyncRead + AsyncWrite + Unpin>(
    link: Link<S>,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
    shared: Option<Shared<'_>>,
) -> Result<Option<Released<S>>, UpstreamError> {
    let (resent, mut maint_rx) = match shared {
        Some(s) => (Some(s.resent), s.maint),
        None => (None, None),
    };
    let mut maint_open = maint_rx.is_some();
    let Link {
        stream,
        generation,
        expires_at,
        leftover,
    } = link;
    let mut tokens = opts.tokens.clone();
    tokens.mark_unchanged();
    let now = Instant::now();
    // A connection handed over with an older credential re-AUTHs at once.
    let reauth_at = (tokens.borrow().generation != generation).then_some(now);
    let mut c = Conn {
        stream,
        rbuf: leftover,
        scanner: ReplyScanner::new(),
        got: 0,
        got_len: 0,
        inflight: VecDeque::new(),
        staged: std::mem::take(pending),
        holding: false,
        out: WriteQueue::new(COPY_BELOW),
        rx,
        rx_open: true,
        released_at: None,
        released_idle: false,
        push,
        opts,
        expiry_out,
        tokens: tokens.clone(),
        generation,
        expires_at,
        in_multi: false,
        reauth_at,
        auth_inflight: false,
        auth_sent: None,
        last_write: now,
        timer: Box::pin(tokio::time::sleep_until(now + opts.keepalive)),
        armed: None,
        retry: resent.is_some(),
        no_resend: resent.as_deref().copied().unwrap_or(0),
        maint: maint_rx.clone(),
        born: now,
        paused: false,
        retiring: false,
        relax_until: None,
    };
    // A drain or a refresh signalled before this connection was made is
    // not for it; one still to come is.
    if let Some(m) = maint_rx.as_mut() {
        let now = *m.borrow_and_update();
        c.on_maint(now);
    }
    c.publish_expiry();
    let mut tokens_open = true;
    let result = loop {
        // A new credential is rare: `changed` is polled once to register for
        // it and then only when the version moved (one atomic load) or it woke
        // the task itself (another), rather than at every wake-up, which would
        // lock its notifier each time. The second condition matters: a
        // wake-up can come with nothing new (this registration raced the
        // sender's notification of the version just taken, or the task's
        // budget ran out), and unless `changed` is polled again then, it is
        // no longer registered and the next credential would go unnoticed.
        let event = {
            let mut changed = pin!(tokens.changed());
            let mut gate = ChangeGate::default();
            let mut maint_changed = pin!(async {
                match maint_rx.as_mut() {
                    Some(m) => m.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            });
            let mut maint_gate = ChangeGate::default();
            poll_fn(|cx| {
                // Before the connection's own progress: a drain announced now
                // must stop the commands this turn would write.
                if let Some(peek) = c.maint.as_ref().filter(|_| maint_open) {
                    let moved = peek.has_changed().unwrap_or(true);
                    if let Poll::Ready(open) = maint_gate.poll(maint_changed.as_mut(), moved, cx) {
                        return Poll::Ready(Event::Maint(open));
                    }
                }
                if let Poll::Ready(r) = c.poll(cx) {
                    return Poll::Ready(Event::End(r));
                }
                if !tokens_open {
                    return Poll::Pending;
                }
                let moved = c.tokens.has_changed().unwrap_or(true);
                match gate.poll(changed.as_mut(), moved, cx) {
                    Poll::Ready(r) => Poll::Ready(Event::Tokens(r.is_ok())),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        match event {
            Event::End(r) => break r,
            Event::Tokens(false) => {
                // The source is gone (shutdown): nothing will change any more.
                tokens_open = false;
            }
            Event::Tokens(true) => {
                let state = tokens.borrow_and_update().clone();
                c.tokens.mark_unchanged();
                if state.generation != c.generation && state.current.is_some() {
                    c.reauth_at = Some(Instant::now() + reauth_jitter(c.expires_at));
                }
            }
            Event::Maint(open) => {
                maint_open = open;
                if let Some(m) = maint_rx.as_mut() {
                    let now = *m.borrow_and_update();
                    if let Some(peek) = c.maint.as_mut() {
                        peek.mark_unchanged();
                    }
                    c.on_maint(now);
                }
            }
        }
    };
    let mut again = c.finish(&result);
    if let Some(n) = resent {
        *n = again.len();
    }
    again.extend(std::mem::take(&mut c.staged));
    *pending = again;
    result?;
    let reusable = c.released_idle
        && c.inflight.is_empty()
        && c.out.is_idle()
        && c.got_len == 0
        && !c.auth_inflight;
    Ok(reusable.then(|| Released {
        stream: c.stream,
        leftover: c.rbuf,
        generation: c.generation,
        expires_at: c.expires_at,
    }))
}

/// What woke the connection's loop.
enum Event {
    /// The connection ended.
    End(Result<(), UpstreamError>),
    /// A new credential (`false`: its source is gone).
    Tokens(bool),
    /// A maintenance signal (`false`: its sender is gone).
    Maint(bool),
}

/// Polls a watch's `changed()` future only when the watch moved or woke the
/// task itself: a wake-up with nothing new (most of them) costs an atomic
/// load, not a lock of the watch's notifier.
#[derive(Default)]
struct ChangeGate {
    watch: Option<Arc<WatchWaker>>,
}

impl ChangeGate {
    fn poll<F: Future>(
        &mut self,
        fut: Pin<&mut F>,
        moved: bool,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        let woke = self
            .watch
            .as_ref()
            .is_none_or(|w| w.woke.load(Ordering::Acquire) && w.woke.swap(false, Ordering::AcqRel));
        if !(woke || moved) {
            return Poll::Pending;
        }
        let w = Arc::new(WatchWaker {
            woke: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(w.clone());
        let res = fut.poll(&mut Context::from_waker(&waker));
        self.watch = Some(w);
        res
    }
}

/// The waker the credential watch is polled with: wakes the connection's
/// task and notes that the watch did.
struct WatchWaker {
    woke: AtomicBool,
    task: Waker,
}

impl Wake for WatchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// One connection's state, driven by [`Conn::poll`].
struct Conn<'a, S> {
    stream: S,
    rbuf: BytesMut,
    scanner: ReplyScanner,
    /// Replies gathered for the head of `inflight` so far (bytes at the front of `rbuf`).
    got: usize,
    got_len: usize,
    /// Written and owing replies, oldest first.
    inflight: VecDeque<Inflight>,
    /// Taken from `rx`, not written yet.
    staged: VecDeque<Request>,
    /// Let other tasks run before writing `staged`, so that more requests
    /// join the same write.
    holding: bool,
    out: WriteQueue,
    rx: &'a mut mpsc::Receiver<Request>,
    /// False once the owner let go: finish the replies owed, then end.
    rx_open: bool,
    released_at: Option<Instant>,
    /// The owner let go while nothing was owed or waiting to be written.
    released_idle: bool,
    push: Option<PushSink>,
    opts: &'a ConnOpts,
    expiry_out: Option<&'a AtomicU64>,
    tokens: TokenWatch,
    generation: u64,
    expires_at: Option<SystemTime>,
    in_multi: bool,
    reauth_at: Option<Instant>,
    auth_inflight: bool,
    /// When the AUTH in flight was queued (for its span).
    auth_sent: Option<SystemTime>,
    last_write: Instant,
    /// One timer for the reply timeout, keepalive, re-AUTH and release
    /// deadlines: never later than the earliest of them.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Where `timer` is set; `None` once it fired.
    armed: Option<Instant>,
    /// Requests in flight when the connection is lost may be sent again.
    retry: bool,
    /// The next this many requests written were sent again already.
    no_resend: usize,
    /// The maintenance signal, to see whether it moved (shared connections).
    maint: Option<watch::Receiver<Maint>>,
    /// When this connection was made (a [`Maint`] applies to older ones).
    born: Instant,
    /// A close is announced: take no new commands, finish the replies owed.
    paused: bool,
    /// Replaced after a maintenance: take no new commands, end once the
    /// replies owed are in.
    retiring: bool,
    /// The node announced a move or failover: replies may come this much
    /// later (see [`Maint::relax_until`]).
    relax_until: Option<Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    fn publish_expiry(&self) {
        if let Some(out) = self.expiry_out {
            out.store(unix_secs(self.expires_at), Ordering::Release);
        }
    }

    /// Make progress on everything that is ready; `Ready` when the connection
    /// ends (`Ok` once released and every reply is handed out).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            let mut again = false;
            // Replies first: a connection the server closed is noticed before
            // anything more is taken from `rx` for it.
            resp::reserve_for_read(&mut self.rbuf);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(UpstreamError::Lost {
                        reason: "server closed the connection".into(),
                    }))
                }
                Poll::Ready(Ok(_)) => {
                    if let Err(e) = self.hand_out() {
                        return Poll::Ready(Err(e));
                    }
                    again = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(UpstreamError::Lost {
                        reason: e.to_string(),
                    }))
                }
                Poll::Pending => {}
            }
            // Take requests only when the last write went out: what waits in
            // `rx` (or `staged`) was never written anywhere.
            let held = std::mem::take(&mut self.holding);
            let intake = !self.paused && !self.retiring;
            if self.out.is_idle() && self.rx_open && intake {
                let mut taken = 0;
                while self.staged.len() < BATCH {
                    match self.rx.poll_recv(cx) {
                        Poll::Ready(Some(req)) => {
                            self.staged.push_back(req);
                            taken += 1;
                        }
                        Poll::Ready(None) => {
                            self.rx_open = false;
                            self.released_at = Some(Instant::now());
                            self.released_idle = self.inflight.is_empty()
                                && self.staged.is_empty()
                                && self.got_len == 0;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                // A full batch: come back for the rest (no waker registered).
                let full = self.staged.len() >= BATCH;
                again |= full;
                // Requests arriving while others await their replies come from
                // several clients at once: give the rest of them one turn of
                // the scheduler to join this write (one TLS record, one
                // syscall, one read for the server). A lone request is written
                // at once.
                self.holding =
                    !held && taken > 0 && self.rx_open && !full && !self.inflight.is_empty();
            }
            if !self.holding {
                if !self.staged.is_empty() && intake {
                    let now = Instant::now();
                    while let Some(req) = self.staged.pop_front() {
                        self.queue(req, now);
                    }
                }
                if self.reauth_at.is_some_and(|t| t <= Instant::now()) && self.may_reauth() {
                    // Due while we were busy: goes right behind this batch.
                    self.queue_reauth();
                }
                if !self.out.is_idle() {
                    match self.out.poll_write(Pin::new(&mut self.stream), cx) {
                        Poll::Ready(Ok(())) => self.last_write = Instant::now(),
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err(UpstreamError::Lost {
                                reason: format!("write failed: {e}"),
                            }))
                        }
                        Poll::Pending => {}
                    }
                }
            }
            if (!self.rx_open || self.retiring) && self.inflight.is_empty() && self.out.is_idle() {
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = self.next_deadline() {
                // Re-armed only when the deadline moves earlier (or the timer
                // fired): a later one leaves the timer early, where it fires,
                // finds nothing due and is re-armed. Cheaper than moving the
                // timer for every command.
                if self.armed.is_none_or(|a| deadline < a) {
                    self.timer.as_mut().reset(deadline);
                    self.armed = Some(deadline);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    self.armed = None;
                    if let Err(e) = self.on_timer() {
                        return Poll::Ready(e);
                    }
                    again = true;
                }
            }
            if self.holding {
                // Back of the run queue: the clients already woken go first.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !again {
                return Poll::Pending;
            }
        }
    }

    /// The maintenance signal now says `m`.
    fn on_maint(&mut self, m: Maint) {
        let paused = m.drain_before.is_some_and(|t| self.born < t);
        let retiring = self.retiring || m.retire_before.is_some_and(|t| self.born < t);
        if paused != self.paused || retiring != self.retiring {
            info!(
                kind = self.opts.kind,
                paused,
                retiring,
                in_flight = self.inflight.len(),
                "upstream connection follows a maintenance notice"
            );
        }
        self.paused = paused;
        self.retiring = retiring;
        self.relax_until = m.relax_until;
    }

    /// When a reply written at `written_at` is overdue: the reply timeout
    /// after it, or after the end of a relaxed window (a node busy moving or
    /// failing over), whichever is later.
    fn reply_deadline(&self, written_at: Instant) -> Instant {
        let normal = written_at + self.opts.reply_timeout;
        match self.relax_until {
            Some(r) => normal.max(r + self.opts.reply_timeout),
            None => normal,
        }
    }

    /// A keepalive PING may be sent: idle, and not inside MULTI, where the
    /// server would queue it and put its reply into the EXEC array.
    fn may_ping(&self) -> bool {
        self.rx_open && self.out.is_idle() && !self.in_multi
    }

    /// Re-AUTH is allowed now: not inside MULTI, none in flight, not released.
    fn may_reauth(&self) -> bool {
        self.rx_open && !self.in_multi && !self.auth_inflight
    }

    /// The earliest of the deadlines that apply now; each one has something to
    /// do when it passes, so the timer never fires twice for nothing.
    fn next_deadline(&self) -> Option<Instant> {
        let keepalive = self
            .may_ping()
            .then(|| self.last_write + self.opts.keepalive);
        let reply = self
            .inflight
            .front()
            .map(|head| self.reply_deadline(head.written_at));
        let reauth = self.reauth_at.filter(|_| self.may_reauth());
        let release = self.released_at.map(|t| t + self.opts.reply_timeout);
        [keepalive, reply, reauth, release]
            .into_iter()
            .flatten()
            .min()
    }

    /// The timer fired: whatever is due. `Err` ends the connection.
    fn on_timer(&mut self) -> Result<(), Result<(), UpstreamError>> {
        let now = Instant::now();
        if let Some(t) = self.released_at {
            if t + self.opts.reply_timeout <= now {
                // Released by the owner; the last replies did not come in time.
                return Err(Ok(()));
            }
        }
        if let Some(head) = self.inflight.front() {
            if self.reply_deadline(head.written_at) <= now {
                return Err(Err(UpstreamError::Timeout {
                    addr: self.opts.addr.clone(),
                    secs: self.opts.reply_timeout.as_secs_f64(),
                    during: "waiting for a reply",
                }));
            }
        }
        if self.reauth_at.is_some_and(|t| t <= now) && self.may_reauth() {
            self.queue_reauth();
        }
        if self.may_ping() && self.last_write + self.opts.keepalive <= now {
            // Idle: a PING keeps Azure from closing the connection.
            self.out.push_slice(b"*1\r\n$4\r\nPING\r\n");
            self.inflight.push_back(Inflight {
                resend: None,
                count: 1,
                pushes: 0,
                sink: Sink::Ping,
                written_at: now,
            });
        }
        Ok(())
    }

    /// Add a request to the write queue (written by the caller's next step).
    fn queue(&mut self, req: Request, now: Instant) {
        // Kept (a reference count, no copy) while it may be sent again.
        let resend = (self.retry
            && self.no_resend == 0
            && !self.in_multi
            && !req.in_multi_after
            && req.pushes == 0
            && req.bytes.len() <= COPY_BELOW)
            .then(|| req.bytes.clone());
        self.no_resend = self.no_resend.saturating_sub(1);
        self.in_multi = req.in_multi_after;
        self.out.push(req.bytes);
        if req.count == 0 && req.pushes == 0 {
            // Owes nothing: complete as soon as it is written.
            if let Some(tx) = req.reply {
                self.mark();
                let _ = tx.send(Ok(Bytes::new()));
            }
            return;
        }
        self.inflight.push_back(Inflight {
            resend,
            count: req.count,
            pushes: req.pushes,
            sink: Sink::Client(req.reply),
            written_at: now,
        });
    }

    fn queue_reauth(&mut self) {
        self.reauth_at = None;
        let state = self.tokens.borrow().clone();
        let Some(cred) = state.usable(SystemTime::now()).cloned() else {
            return;
        };
        let cmd = resp::command(&[
            b"AUTH",
            cred.username.as_bytes(),
            cred.password.expose().as_bytes(),
        ]);
        self.out.push(cmd);
        self.inflight.push_back(Inflight {
            resend: None,
            count: 1,
            pushes: 0,
            sink: Sink::Auth {
                generation: state.generation,
                expires_at: cred.expires_at,
            },
            written_at: Instant::now(),
        });
        self.auth_inflight = true;
        self.auth_sent = Some(SystemTime::now());
    }

    fn on_auth_reply(
        &mut self,
        reply: &[u8],
        generation: u64,
        expires_at: Option<SystemTime>,
    ) -> Result<(), UpstreamError> {
        self.auth_inflight = false;
        let user = {
            let state = self.tokens.borrow();
            match &state.current {
                Some(c) if state.generation == generation => c.username.clone(),
                _ => String::new(),
            }
        };
        if let (Some(otel), Some(start)) = (self.opts.metrics.otel(), self.auth_sent.take()) {
            otel.finished(
                "redis re-AUTH",
                3,
                start,
                vec![
                    crate::otel::encode::attr_str("db.system.name", "redis"),
                    crate::otel::encode::attr_str("server.address", &self.opts.addr),
                    crate::otel::encode::attr_str(
                        "redis_entra_proxy.connection.kind",
                        self.opts.kind,
                    ),
                    crate::otel::encode::attr_int(
                        "redis_entra_proxy.token.generation",
                        generation as i64,
                    ),
                ],
                resp::error_text(reply).map(|r| r.to_string()),
            );
        }
        let acceptance = &self.opts.metrics.acceptance;
        match resp::error_text(reply) {
            None => {
                acceptance.accepted(generation, &user);
                self.generation = generation;
                self.expires_at = expires_at;
                self.publish_expiry();
                self.opts.metrics.reauth("ok");
                info!(
                    kind = self.opts.kind,
                    generation, "upstream connection re-authenticated"
                );
                Ok(())
            }
            Some(reason) => {
                acceptance.refused(generation, &user, &reason, std::time::Instant::now());
                self.opts.metrics.reauth("failed");
                warn!(kind = self.opts.kind, %reason, "re-AUTH refused; retiring the connection");
                Err(UpstreamError::Auth {
                    addr: self.opts.addr.clone(),
                    reason,
                })
            }
        }
    }

    /// Hand out every complete reply in the read buffer, FIFO.
    fn hand_out(&mut self) -> Result<(), UpstreamError> {
        loop {
            let reply = match self.scanner.scan(&self.rbuf[self.got_len..]) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
            };
            if reply.push {
                // Out of band: never part of a request's replies.
                let got_len = self.got_len;
                let frame = if got_len == 0 {
                    self.rbuf.split_to(reply.len)
                } else {
                    let f = BytesMut::from(&self.rbuf[got_len..got_len + reply.len]);
                    let tail = self.rbuf.split_off(got_len + reply.len);
                    self.rbuf.truncate(got_len);
                    self.rbuf.unsplit(tail);
                    f
                }
                .freeze();
                // A pub/sub confirmation may be what the request at the head
                // of the queue is waiting for.
                if got_len == 0 && is_confirmation(&frame) {
                    if let Some(head) = self.inflight.front_mut().filter(|h| h.pushes > 0) {
                        head.pushes -= 1;
                        if head.pushes == 0 {
                            let done = self.inflight.pop_front().expect("checked above");
                            self.complete(done.sink, Bytes::new())?;
                        }
                    }
                }
                if let Some(p) = &self.push {
                    let _ = p.tx.send(frame);
                }
                continue;
            }
            let Some(cur) = self.inflight.front() else {
                // A pinned connection in MONITOR mode streams lines nobody
                // asked for: they belong to its client, like push frames
                // (never on a shared connection: there it is an error).
                if let (Some(p), 0, false) = (&self.push, self.got_len, self.retry) {
                    let _ = p.tx.send(self.rbuf.split_to(reply.len).freeze());
                    continue;
                }
                return Err(UpstreamError::Protocol(
                    "reply with no command waiting for it".into(),
                ));
            };
            if cur.pushes > 0 {
                // A request answered by confirmations got a reply instead: its
                // error (it never has replies of its own).
                let bytes = self.rbuf.split_to(reply.len).freeze();
                let done = self.inflight.pop_front().expect("checked above");
                self.complete(done.sink, bytes)?;
                continue;
            }
            self.got += 1;
            self.got_len += reply.len;
            if self.got < cur.count {
                continue;
            }
            let bytes = self.rbuf.split_to(self.got_len).freeze();
            self.got = 0;
            self.got_len = 0;
            let cur = self.inflight.pop_front().expect("checked above");
            self.complete(cur.sink, bytes)?;
        }
    }

    /// Before a reply goes to its request's sender: the mark that tells the
    /// owner of a marked push sink which push frames came before it.
    fn mark(&self) {
        if let Some(p) = self.push.as_ref().filter(|p| p.marks) {
            let _ = p.tx.send(Bytes::new());
        }
    }

    /// A request's replies are all in: hand them to where they go.
    fn complete(&mut self, sink: Sink, bytes: Bytes) -> Result<(), UpstreamError> {
        match sink {
            Sink::Client(Some(tx)) => {
                self.mark();
                let _ = tx.send(Ok(bytes));
            }
            Sink::Client(None) | Sink::Ping => {}
            Sink::Auth {
                generation,
                expires_at,
            } => self.on_auth_reply(&bytes, generation, expires_at)?,
        }
        Ok(())
    }

    /// The connection ended: fail what it still owes, with the reason, or
    /// give back what may be sent again on the next connection (lost
    /// connections only, see [`run_shared`]).
    fn finish(&mut self, result: &Result<(), UpstreamError>) -> VecDeque<Request> {
        let err = match result {
            Ok(()) | Err(UpstreamError::Shutdown) => {
                // Its owner let go (a pinned client done, or shutdown): routine.
                debug!(kind = self.opts.kind, "upstream connection released");
                UpstreamError::Lost {
                    reason: "connection released".into(),
                }
            }
            Err(e) => {
                info!(kind = self.opts.kind, error = %e, "upstream connection closed");
                e.clone()
            }
        };
        let lost = self.retry && matches!(result, Err(UpstreamError::Lost { .. }));
        let kinds: Vec<InFlight> = self
            .inflight
            .iter()
            .map(|i| match (&i.sink, &i.resend) {
                (Sink::Client(_), Some(b)) if lost && retry::request_read_only(b) => InFlight::Safe,
                (Sink::Client(_), _) => InFlight::Unsafe,
                _ => InFlight::Own,
            })
            .collect();
        let plan = retry::resend_plan(&kinds);
        let mut again = VecDeque::new();
        for (i, resend) in self.inflight.drain(..).zip(plan) {
            match i.sink {
                Sink::Client(reply) if resend => again.push_back(Request {
                    bytes: i.resend.expect("safe only with its bytes"),
                    count: i.count,
                    reply,
                    in_multi_after: false,
                    pushes: 0,
                }),
                Sink::Client(reply) => fail(reply, err.clone()),
                Sink::Auth { .. } => self.opts.metrics.reauth("failed"),
                Sink::Ping => {}
            }
        }
        if !again.is_empty() {
            self.opts.metrics.upstream_resent.inc_by(again.len() as u64);
            info!(
                kind = self.opts.kind,
                resent = again.len(),
                "read-only commands in flight on the lost connection go again on the next one"
            );
        }
        again
    }
}
