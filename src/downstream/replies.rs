//! The replies a client is owed, in order, and what may be written between
//! them (push frames from its pinned connection, the pub/sub hub's messages),
//! with their budgets: commands owed, bytes waiting to be written, push bytes.
//! The session ([`super::session`]) queues entries and drives [`Client::poll_out`]
//! from its one poll loop.

use crate::metrics::{ErrorKind, Metrics};
use crate::upstream::conn::PushSink;
use crate::upstream::pubsub::{Link, ToClient};
use crate::upstream::UpstreamError;
use crate::write_queue::WriteQueue;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::warn;

mod own;
use own::count_own;
pub(super) use own::OwnMessages;

/// A reply owed to the client, in order.
pub(super) enum Out {
    Now(Bytes),
    /// Replies to `count` commands, coming from upstream.
    Wait {
        rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
        count: usize,
        since: Instant,
        /// CLIENT REPLY OFF/SKIP: the reply is taken and dropped.
        silent: bool,
        /// A PUBLISH to a channel the client listens to itself: the reply
        /// waits for the client's own messages (see [`OwnMessages`]).
        own: Option<Box<OwnMessages>>,
        /// The command name it is recorded under (OpenTelemetry).
        op: crate::otel::ops::Op,
        /// From a pinned connection whose push frames come with a mark
        /// before each reply: the pushes before the mark go first.
        marked: bool,
    },
    /// The confirmations of pub/sub command `seq`, queued by the hub: write
    /// the hub's frames up to them.
    Hub(u64),
}

/// Stop reading a client that owes this many replies (it is not reading them).
pub(super) const MAX_OWED: usize = 1024;
/// How long a closing session waits for the client to close its side, and
/// how much of its input it reads meanwhile (see [`Client::close`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// Reply bytes a client may leave unread before the proxy stops reading its
/// commands (back-pressure), unless `limits.max_buffered_bytes` is smaller.
pub(super) const WINDOW: usize = 4 << 20;
/// Replies of at least this many bytes are written without a copy.
pub(super) const COPY_BELOW: usize = 16 * 1024;
/// Pub/sub messages are taken from the hub's queue only while fewer bytes than
/// this wait to be written: the rest stay in that queue, where they count
/// against `limits.max_pubsub_queued_bytes`.
pub(super) const HUB_WRITE_AHEAD: usize = 64 * 1024;

/// A client's byte stream, whichever listener it came from.
pub(super) trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

/// The client connection and the replies it is owed, in order.
pub(super) struct Client {
    pub(super) io: Box<dyn ClientIo>,
    pub(super) owed: VecDeque<Out>,
    /// `Out::Wait` entries in `owed`: replies still due from upstream.
    pub(super) waits: usize,
    /// `Out::Wait` entries in `owed` waiting for the client's own messages.
    pub(super) owns: usize,
    /// Recent size of one reply (0: none seen yet), for back-pressure.
    pub(super) reply_size: usize,
    pub(super) out: WriteQueue,
    pub(super) max_out: usize,
    /// Written push frames may wait up to this many bytes (MONITOR, tracking).
    pub(super) max_push: usize,
    /// Replies owed to commands sent upstream (a batch counts each command).
    pub(super) owed_replies: usize,
    /// Push frames (invalidations, MONITOR lines) from the pinned connection,
    /// and the marks it sends before each reply (`PushSink::marked`).
    pub(super) push: Option<mpsc::UnboundedReceiver<Bytes>>,
    /// Marked `Out::Wait` entries in `owed`.
    pub(super) marked: usize,
    /// A mark was taken from `push` between replies: the frames after it
    /// wait until a marked reply has been written.
    pub(super) push_held: bool,
    /// What the hub queues for this client; made with its [`Link`].
    pub(super) hub: Option<HubFeed>,
    /// Bytes read from the client while a blocking command waited (to notice
    /// it leaving): the session scans them next.
    pub(super) inbox: BytesMut,
    /// Writing to the client failed, or it closed: it is gone.
    pub(super) gone: bool,
    /// The hub dropped this client for not reading its messages: nothing more
    /// is written, and the connection closes without flushing what is queued.
    pub(super) killed: bool,
    pub(super) metrics: Arc<Metrics>,
    /// The client's own cluster dispatchers (at most one but while a
    /// replaced one finishes): polled here, in the session's task, so a
    /// command's way is session -> node connection -> session, as on one
    /// endpoint, and nothing of another client's waits behind them.
    pub(super) drivers: Vec<crate::upstream::cluster::dispatch::Driver>,
}

/// What the hub queues for this client, and the count of message bytes in it.
pub(super) struct HubFeed {
    pub(super) rx: mpsc::UnboundedReceiver<ToClient>,
    pub(super) open: bool,
    pub(super) queued: Arc<AtomicUsize>,
    /// The last pub/sub command whose confirmations were queued for writing.
    pub(super) done: u64,
    /// The hub's kill: polled once to register for it, then only once it
    /// fired (as the drain is).
    pub(super) kill: CancellationToken,
    pub(super) killed: std::pin::Pin<Box<WaitForCancellationFutureOwned>>,
    pub(super) kill_registered: bool,
}

impl HubFeed {
    pub(super) fn new(link: &Link, rx: mpsc::UnboundedReceiver<ToClient>) -> Self {
        HubFeed {
            rx,
            open: true,
            queued: link.queued.clone(),
            done: 0,
            kill: link.kill.clone(),
            killed: Box::pin(link.kill.clone().cancelled_owned()),
            kill_registered: false,
        }
    }

    pub(super) fn is_killed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.kill_registered && !self.kill.is_cancelled() {
            return false;
        }
        self.kill_registered = true;
        self.killed.as_mut().poll(cx).is_ready()
    }

    /// Take the next frame from the hub into `out`; false when there is none
    /// now (the waker is then registered) or the queue is closed.
    pub(super) fn take_one(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: &mut WriteQueue,
        metrics: &Metrics,
    ) -> bool {
        self.take_seen(cx, out, metrics, &mut |_| {})
    }

    /// [`Self::take_one`], showing each message frame taken to `seen`.
    pub(super) fn take_seen(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: &mut WriteQueue,
        metrics: &Metrics,
        seen: &mut dyn FnMut(&[u8]),
    ) -> bool {
        if !self.open {
            return false;
        }
        let bytes = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ToClient::Message(b))) => {
                self.queued.fetch_sub(b.len(), Ordering::AcqRel);
                seen(&b);
                b
            }
            Poll::Ready(Some(ToClient::Reply { bytes, seq })) => {
                self.done = seq;
                bytes
            }
            Poll::Ready(None) => {
                self.open = false;
                return false;
            }
            Poll::Pending => return false,
        };
        metrics.bytes_out.inc_by(bytes.len() as u64);
        out.push(bytes);
        true
    }
}

impl Client {
    /// Take more commands only while the client is taking its replies
    /// (back-pressure, never a cut-off): fewer than [`MAX_OWED`] owed
    /// (counted by command, with `more` about to be sent), and the reply bytes
    /// not yet written plus those expected of the commands in flight within
    /// the window. Memory per client stays within the window plus one reply
    /// (while reply sizes hold steady; a sudden jump is bounded by the
    /// commands in flight).
    pub(super) fn may_send(&self, more: usize) -> bool {
        if self.owed_replies + more >= MAX_OWED || self.owed.len() >= MAX_OWED {
            return false;
        }
        let unread = self.out.queued_bytes();
        let window = self.window();
        if unread >= window {
            return false;
        }
        let in_flight = self.owed_replies + more;
        if in_flight <= 1 {
            // One command at a time may always go, whatever its reply's size.
            return true;
        }
        // The replies of the others, at this client's recent reply size;
        // while that is unknown (no reply yet), one command at a time.
        let expected = (in_flight - 1).saturating_mul(self.reply_size);
        self.reply_size > 0 && unread.saturating_add(expected) < window
    }

    /// Unread reply bytes past which no more of the client's commands are
    /// sent (nor read): [`WINDOW`], or `limits.max_buffered_bytes` if smaller.
    fn window(&self) -> usize {
        WINDOW.min(self.max_out)
    }

    /// Close so that everything written arrives: end the write side (FIN
    /// after the last reply), then read and drop what the client still
    /// sends until it closes (at most [`LINGER_BYTES`] within [`LINGER`]).
    /// Closing with input unread makes the kernel answer with RST, which
    /// discards replies not yet delivered (an error line after a protocol
    /// error, say).
    pub(super) async fn close(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.gone {
            return;
        }
        let io = &mut self.io;
        let _ = tokio::time::timeout(LINGER, async {
            if io.shutdown().await.is_err() {
                return;
            }
            let mut sink = vec![0u8; 16 * 1024];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match io.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// A reply from a marked pinned connection (`marked`; in `owed`, or
    /// awaited outside it with nothing else owed) is about to be written:
    /// queue the push frames sent before it, so they are written before it.
    pub(super) fn pushes_before(&mut self, marked: bool, cx: &mut std::task::Context<'_>) {
        if marked
            && !pushes_to_mark(
                &mut self.push,
                &mut self.push_held,
                &mut self.out,
                &self.metrics,
                self.max_push,
                cx,
            )
        {
            self.killed = true;
            self.gone = true;
        }
    }

    /// A marked reply is no longer owed. With none left, no mark waits for
    /// one.
    pub(super) fn unmark(&mut self) {
        self.marked -= 1;
        self.push_held &= self.marked > 0;
    }

    pub(super) fn may_read(&self) -> bool {
        self.may_send(0)
    }

    /// Queue the replies that have arrived, in command order, each pub/sub
    /// command's confirmations in that command's place, and push frames and
    /// pub/sub messages (only ever between whole replies); write what the
    /// socket takes. Never waits: registers for wake-up on whatever is not
    /// ready. Writes nothing more once the hub killed the client.
    pub(super) fn poll_out(&mut self, cx: &mut std::task::Context<'_>) {
        self.drivers
            .retain_mut(|d| d.as_mut().poll(cx).is_pending());
        loop {
            if self.killed {
                return;
            }
            if let Some(hub) = &mut self.hub {
                if hub.is_killed(cx) {
                    self.killed = true;
                    self.gone = true;
                    return;
                }
            }
            let held_back = self.queue_out(cx);
            if self.gone || self.out.is_idle() {
                return;
            }
            match self.out.poll_write(std::pin::Pin::new(&mut self.io), cx) {
                Poll::Ready(Ok(())) if held_back => {}
                Poll::Ready(Ok(())) | Poll::Pending => return,
                Poll::Ready(Err(_)) => {
                    self.gone = true;
                    return;
                }
            }
        }
    }

    /// Move what is ready to be written into `out`. True when pub/sub frames
    /// were left in the hub's queue because `out` holds enough already (come
    /// back once it is written).
    pub(super) fn queue_out(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        'owed: while let Some(front) = self.owed.front_mut() {
            let bytes = match front {
                Out::Now(b) => std::mem::take(b),
                Out::Hub(seq) => {
                    // The hub queued these confirmations before the session
                    // queued this: everything up to them is in its channel.
                    let seq = *seq;
                    let Some(hub) = &mut self.hub else {
                        self.owed.pop_front();
                        continue;
                    };
                    while hub.done < seq && hub.open {
                        if self.out.queued_bytes() >= HUB_WRITE_AHEAD {
                            return true;
                        }
                        if !hub.take_one(cx, &mut self.out, &self.metrics) && hub.open {
                            // Not there yet: woken when it is.
                            break 'owed;
                        }
                    }
                    self.owed.pop_front();
                    continue;
                }
                Out::Wait {
                    rx,
                    count,
                    since,
                    silent,
                    own,
                    op,
                    marked,
                } => {
                    let res = match own {
                        None => match std::pin::Pin::new(rx).poll(cx) {
                            Poll::Ready(r) => r.unwrap_or_else(|_| Err(connection_ended())),
                            Poll::Pending => break,
                        },
                        Some(own) => {
                            if own.reply.is_none() {
                                match std::pin::Pin::new(rx).poll(cx) {
                                    Poll::Ready(r) => {
                                        own.reply =
                                            Some(r.unwrap_or_else(|_| Err(connection_ended())))
                                    }
                                    Poll::Pending => break,
                                }
                            }
                            if own.delivered() {
                                // The client's own messages first (and any
                                // other message the hub has for it before them).
                                while own.left > 0 {
                                    let Some(hub) = self.hub.as_mut().filter(|h| h.open) else {
                                        break;
                                    };
                                    if self.out.queued_bytes() >= HUB_WRITE_AHEAD {
                                        return true;
                                    }
                                    let mut mine = 0;
                                    let took =
                                        hub.take_seen(cx, &mut self.out, &self.metrics, &mut |f| {
                                            if own.is_own(f) {
                                                mine += 1;
                                            }
                                        });
                                    own.left = own.left.saturating_sub(mine);
                                    if !took && own.left > 0 {
                                        if own.deadline.as_mut().poll(cx).is_ready() {
                                            own.left = 0;
                                        } else {
                                            break 'owed;
                                        }
                                    }
                                }
                            }
                            self.owns -= 1;
                            own.reply.take().unwrap_or_else(|| Err(connection_ended()))
                        }
                    };
                    let (count, silent, since, op) = (*count, *silent, *since, *op);
                    self.owed_replies -= count;
                    if *marked {
                        // What the server sent before this reply goes first
                        // (a failed request had no mark sent).
                        self.pushes_before(res.is_ok(), cx);
                        if self.killed {
                            return false;
                        }
                        self.unmark();
                    }
                    if let Ok(b) = &res {
                        // Recent reply size: up at once, down slowly.
                        let each = b.len() / count.max(1);
                        self.reply_size = each.max(self.reply_size - self.reply_size / 8).max(1);
                    }
                    if silent {
                        self.waits -= 1;
                        self.owed.pop_front();
                        continue;
                    }
                    self.waits -= 1;
                    let elapsed = since.elapsed();
                    self.metrics.command_latency.observe(elapsed.as_secs_f64());
                    if let Some(otel) = self.metrics.otel() {
                        let failed = match &res {
                            Ok(b) => count == 1 && b.first() == Some(&b'-'),
                            Err(_) => true,
                        };
                        otel.command_done(op, count, elapsed, failed);
                    }
                    match res {
                        Ok(b) => b,
                        Err(e) => {
                            if matches!(e, UpstreamError::NoCredential { .. }) {
                                self.metrics.error(ErrorKind::NoCredential);
                            }
                            let one = e.to_reply();
                            let mut b = BytesMut::with_capacity(one.len() * count);
                            for _ in 0..count {
                                b.extend_from_slice(&one);
                            }
                            b.freeze()
                        }
                    }
                }
            };
            let single = matches!(
                self.owed.front(),
                Some(Out::Wait { count: 1, .. }) | Some(Out::Now(_))
            );
            self.owed.pop_front();
            if single && bytes.len() > self.max_out {
                // One reply larger than `limits.max_buffered_bytes`: the only
                // reason a client is closed for its replies (many replies
                // wait under back-pressure instead, see `may_send`).
                warn!(
                    limit = self.max_out,
                    reply_bytes = bytes.len(),
                    "closing a client: one reply is larger than limits.max_buffered_bytes"
                );
                self.metrics.error(ErrorKind::Limit);
                self.killed = true;
                self.gone = true;
                return false;
            }
            self.metrics.bytes_out.inc_by(bytes.len() as u64);
            self.out.push(bytes);
        }
        while let Some(push) = self.push.as_mut().filter(|_| !self.push_held) {
            match push.poll_recv(cx) {
                Poll::Ready(Some(p)) if PushSink::is_mark(&p) => {
                    // The frames after it follow a reply still owed.
                    self.push_held = self.marked > 0;
                }
                Poll::Ready(Some(p)) => {
                    if !take_push(&mut self.out, &self.metrics, self.max_push, p) {
                        self.killed = true;
                        self.gone = true;
                        return false;
                    }
                }
                Poll::Ready(None) => self.push = None,
                Poll::Pending => break,
            }
        }
        // A client's own messages go after the replies of the commands it
        // sent before that PUBLISH: while one waits behind other replies,
        // the hub's frames stay queued (its reply and theirs are in flight).
        let held = self.owns > 0
            && self
                .owed
                .iter()
                .skip(1)
                .any(|o| matches!(o, Out::Wait { own: Some(own), .. } if own.left > 0));
        if let Some(hub) = self.hub.as_mut().filter(|_| !held) {
            // Messages (and confirmations) between whole replies, as long as
            // the client takes them.
            loop {
                if self.out.queued_bytes() >= HUB_WRITE_AHEAD {
                    return true;
                }
                // A client's own messages may come before its PUBLISH's
                // reply: counted now, not waited for later.
                let owed = &mut self.owed;
                if !hub.take_seen(cx, &mut self.out, &self.metrics, &mut |f| {
                    count_own(owed, f)
                }) {
                    break;
                }
            }
        }
        false
    }
}

/// A reply channel dropped without an answer: its connection's task ended.
pub(super) fn connection_ended() -> UpstreamError {
    UpstreamError::Lost {
        reason: "the upstream connection ended".into(),
    }
}

/// Write the push frames the pinned connection sent before the mark of the
/// reply about to be written (a mark already taken between replies counts).
/// False: the client does not read them (over `max_push`).
pub(super) fn pushes_to_mark(
    push: &mut Option<mpsc::UnboundedReceiver<Bytes>>,
    held: &mut bool,
    out: &mut WriteQueue,
    metrics: &Metrics,
    max_push: usize,
    cx: &mut std::task::Context<'_>,
) -> bool {
    if std::mem::take(held) {
        return true;
    }
    while let Some(rx) = push.as_mut() {
        match rx.poll_recv(cx) {
            Poll::Ready(Some(p)) if PushSink::is_mark(&p) => return true,
            Poll::Ready(Some(p)) => {
                if !take_push(out, metrics, max_push, p) {
                    return false;
                }
            }
            Poll::Ready(None) => *push = None,
            Poll::Pending => return true,
        }
    }
    true
}

/// Queue one push frame for the client. False: MONITOR (or tracking) output
/// the client does not read passed `max_push`: it is cut off, as Redis's
/// output buffer limit does.
fn take_push(out: &mut WriteQueue, metrics: &Metrics, max_push: usize, p: Bytes) -> bool {
    metrics.bytes_out.inc_by(p.len() as u64);
    out.push(p);
    if out.queued_bytes() > max_push {
        warn!(
            limit = max_push,
            "closing a client that does not read its MONITOR or tracking output (limits.max_pubsub_queued_bytes)"
        );
        metrics.error(ErrorKind::Limit);
        return false;
    }
    true
}
