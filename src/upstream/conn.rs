//! One authenticated upstream connection run as a task.
//!
//! Requests (raw command bytes + how many replies they owe) arrive on a channel;
//! the task writes them back to back, coalescing whatever is queued into one TLS
//! write (auto-pipelining), reads the replies and hands them back FIFO, all from
//! one poll loop (no split stream, no reader task: a command costs no hand-off
//! inside the connection). Push frames (RESP3 `>`) are out of band and go to the
//! owner's push channel, if any. A request can instead be answered by push
//! frames (the pub/sub hub's SUBSCRIBE and UNSUBSCRIBE: one
//! `subscribe`/`unsubscribe` confirmation per channel, or one error reply), and
//! is matched in the same FIFO.
//!
//! The task also owns the connection's credential: when the token source
//! publishes a new generation it injects `AUTH <user> <token>` (after a jitter,
//! and never inside MULTI) and consumes the reply; a failed re-AUTH retires the
//! connection. Idle connections send PING so Azure does not close them.

use super::tls::{Authed, Stream};
use super::UpstreamError;
use crate::auth::TokenWatch;
use crate::metrics::Metrics;
use crate::resp;
use crate::resp::scan::ReplyScanner;
use crate::write_queue::WriteQueue;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Where a request's replies go.
pub type ReplyTx = oneshot::Sender<Result<Bytes, UpstreamError>>;

/// Raw command bytes to write, owing `count` replies.
pub struct Request {
    pub bytes: Bytes,
    pub count: usize,
    pub reply: Option<ReplyTx>,
    /// The connection is inside MULTI after this request: defer re-AUTH.
    pub in_multi_after: bool,
    /// With `count` 0: the request is answered by this many pub/sub
    /// confirmation push frames (`subscribe`, `unsubscribe`, ...), which also go
    /// to the push sink, or by one error reply instead. Its reply is then empty
    /// (confirmed) or that error.
    pub pushes: usize,
}

/// Settings every connection task shares.
#[derive(Clone)]
pub struct ConnOpts {
    pub addr: String,
    pub reply_timeout: Duration,
    pub keepalive: Duration,
    pub tokens: TokenWatch,
    pub metrics: Arc<Metrics>,
    /// `shared`, `pinned` or `pubsub`, for logs and metrics.
    pub kind: &'static str,
}

/// Out-of-band frames for the owner: a pinned connection's client (tracking
/// invalidations, MONITOR lines) or the pub/sub hub.
pub struct PushSink {
    pub tx: mpsc::UnboundedSender<Bytes>,
}

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
    count: usize,
    /// Confirmation push frames still owed (see [`Request::pushes`]).
    pushes: usize,
    sink: Sink,
    written_at: Instant,
}

/// Larger requests are written from their own buffer instead of being copied.
const COPY_BELOW: usize = 64 * 1024;
/// Requests taken from the channel per write.
const BATCH: usize = 256;

/// Run `conn` until it fails or `rx` closes. One task does everything: takes
/// requests, writes them, reads replies and hands them out FIFO, re-AUTHs and
/// keeps the connection alive. Requests still in `rx` when the connection
/// fails were never written, and neither were those left in `pending` (taken,
/// not yet written): a supervisor can carry both to a new connection. Requests
/// in `pending` when called are written first.
///
/// A panic inside (a bug: no byte from the server should cause one) ends this
/// connection with an error, like any other failure, so its supervisor
/// reconnects; requests it had taken get their errors when their reply
/// channels drop.
pub async fn run(
    conn: Authed,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
) -> Result<(), UpstreamError> {
    run_reusable(conn, rx, opts, push, pending, expiry_out)
        .await
        .map(|_| ())
}

/// A connection its owner let go of with nothing in flight: the stream and
/// the credential it holds now, for the pool to reset and reuse.
pub struct Released<S = Stream> {
    pub stream: S,
    pub leftover: BytesMut,
    pub generation: u64,
    pub expires_at: Option<SystemTime>,
}

/// [`run`], handing the connection back when its owner let go of it while it
/// owed nothing (no request in flight or unwritten, no partial reply read):
/// only then is its state known well enough to `RESET` and reuse it. A
/// connection released while a reply was still owed (a client gone in the
/// middle of a blocking command) is closed as before.
pub async fn run_reusable(
    conn: Authed,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
) -> Result<Option<Released>, UpstreamError> {
    let Authed {
        stream,
        generation,
        expires_at,
        leftover,
        ..
    } = conn;
    let link = Link {
        stream,
        generation,
        expires_at,
        leftover,
    };
    run_on(link, rx, opts, push, pending, expiry_out).await
}

/// An authenticated byte stream to the server, whatever carries it: TLS to
/// Azure, or an in-memory pipe to a scripted server in tests.
pub struct Link<S> {
    pub stream: S,
    /// Credential generation it authenticated with.
    pub generation: u64,
    pub expires_at: Option<SystemTime>,
    /// Bytes read past the handshake reply.
    pub leftover: BytesMut,
}

/// [`run_reusable`] over any stream.
pub async fn run_on<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: Link<S>,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
) -> Result<Option<Released<S>>, UpstreamError> {
    let task = Box::pin(run_inner(link, rx, opts, push, pending, expiry_out));
    catch_panic(task).await.unwrap_or_else(|msg| {
        tracing::error!(kind = opts.kind, panic = %msg, "upstream connection task panicked; replacing the connection");
        Err(UpstreamError::Protocol(format!(
            "internal error in the proxy's connection task: {msg}"
        )))
    })
}

/// Poll `f`, turning a panic into `Err` with its message.
pub fn catch_panic<F: Future + Unpin>(mut f: F) -> impl Future<Output = Result<F::Output, String>> {
    poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Pin::new(&mut f).poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into()))),
        }
    })
}

async fn run_inner<S: AsyncRead + AsyncWrite + Unpin>(
    link: Link<S>,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
) -> Result<Option<Released<S>>, UpstreamError> {
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
        last_write: now,
        timer: Box::pin(tokio::time::sleep_until(now + opts.keepalive)),
        armed: None,
    };
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
            let mut watch: Option<Arc<WatchWaker>> = None;
            poll_fn(|cx| {
                if let Poll::Ready(r) = c.poll(cx) {
                    return Poll::Ready(Err(r));
                }
                if !tokens_open {
                    return Poll::Pending;
                }
                let woke = watch.as_ref().is_none_or(|w| {
                    w.woke.load(Ordering::Acquire) && w.woke.swap(false, Ordering::AcqRel)
                });
                if woke || c.tokens.has_changed().unwrap_or(true) {
                    let w = Arc::new(WatchWaker {
                        woke: AtomicBool::new(false),
                        task: cx.waker().clone(),
                    });
                    let waker = Waker::from(w.clone());
                    let res = changed.as_mut().poll(&mut Context::from_waker(&waker));
                    watch = Some(w);
                    if let Poll::Ready(r) = res {
                        return Poll::Ready(Ok(r.is_ok()));
                    }
                }
                Poll::Pending
            })
            .await
        };
        match event {
            Err(r) => break r,
            Ok(false) => {
                // The source is gone (shutdown): nothing will change any more.
                tokens_open = false;
            }
            Ok(true) => {
                let state = tokens.borrow_and_update().clone();
                c.tokens.mark_unchanged();
                if state.generation != c.generation && state.current.is_some() {
                    c.reauth_at = Some(Instant::now() + reauth_jitter(c.expires_at));
                }
            }
        }
    };
    c.finish(&result);
    *pending = std::mem::take(&mut c.staged);
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
    last_write: Instant,
    /// One timer for the reply timeout, keepalive, re-AUTH and release
    /// deadlines: never later than the earliest of them.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Where `timer` is set; `None` once it fired.
    armed: Option<Instant>,
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
            if self.out.is_idle() && self.rx_open {
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
                if !self.staged.is_empty() {
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
            if !self.rx_open && self.inflight.is_empty() && self.out.is_idle() {
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
            .map(|head| head.written_at + self.opts.reply_timeout);
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
            if head.written_at + self.opts.reply_timeout <= now {
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
        self.in_multi = req.in_multi_after;
        self.out.push(req.bytes);
        if req.count == 0 && req.pushes == 0 {
            // Owes nothing: complete as soon as it is written.
            if let Some(tx) = req.reply {
                let _ = tx.send(Ok(Bytes::new()));
            }
            return;
        }
        self.inflight.push_back(Inflight {
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
            count: 1,
            pushes: 0,
            sink: Sink::Auth {
                generation: state.generation,
                expires_at: cred.expires_at,
            },
            written_at: Instant::now(),
        });
        self.auth_inflight = true;
    }

    fn on_auth_reply(
        &mut self,
        reply: &[u8],
        generation: u64,
        expires_at: Option<SystemTime>,
    ) -> Result<(), UpstreamError> {
        self.auth_inflight = false;
        match resp::error_text(reply) {
            None => {
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
                // asked for: they belong to its client, like push frames.
                if let (Some(p), 0) = (&self.push, self.got_len) {
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

    /// A request's replies are all in: hand them to where they go.
    fn complete(&mut self, sink: Sink, bytes: Bytes) -> Result<(), UpstreamError> {
        match sink {
            Sink::Client(Some(tx)) => {
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

    /// The connection ended: fail what it still owes, with the reason.
    fn finish(&mut self, result: &Result<(), UpstreamError>) {
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
        for i in self.inflight.drain(..) {
            match i.sink {
                Sink::Client(reply) => fail(reply, err.clone()),
                Sink::Auth { .. } => self.opts.metrics.reauth("failed"),
                Sink::Ping => {}
            }
        }
    }
}

/// Whether a push frame confirms a (P|S)(UN)SUBSCRIBE (rather than being a
/// message or an invalidation).
pub fn is_confirmation(frame: &[u8]) -> bool {
    matches!(
        resp::push_head(frame),
        Some((
            b"subscribe"
                | b"unsubscribe"
                | b"psubscribe"
                | b"punsubscribe"
                | b"ssubscribe"
                | b"sunsubscribe",
            _
        ))
    )
}

/// Seconds since the epoch, 0 for "never expires".
pub fn unix_secs(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs().max(1))
}

/// Spread a pool's re-AUTHs over an eighth of the time the old credential has
/// left (at most 30 s), so hundreds of connections do not AUTH in one burst and
/// all finish well before the old token expires.
fn reauth_jitter(old_expiry: Option<SystemTime>) -> Duration {
    let left = old_expiry
        .and_then(|e| e.duration_since(SystemTime::now()).ok())
        .unwrap_or(Duration::from_secs(240));
    let window = (left / 8).min(Duration::from_secs(30));
    window.mul_f64(fastrand::f64())
}

pub(crate) fn fail(reply: Option<ReplyTx>, e: UpstreamError) {
    if let Some(tx) = reply {
        let _ = tx.send(Err(e));
    }
}

/// Requests for a connection that may be replaced underneath (shared slots).
#[derive(Clone)]
pub struct Handle {
    pub tx: mpsc::Sender<Request>,
}

pub use supervisor::supervise_shared;

/// Reconnect delay: exponential from 50 ms, capped at 5 s, with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(7)))
        .min(Duration::from_secs(5));
    cap.mul_f64(0.5 + fastrand::f64() / 2.0)
}

mod supervisor;
#[cfg(test)]
mod tests;
