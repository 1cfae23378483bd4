//! One client connection: read commands, answer the local ones, send the rest
//! upstream, and write replies back in the order the commands came.
//!
//! One task per client: it reads and routes commands, and writes each reply
//! as soon as it and every reply before it have arrived, from the same poll
//! loop (no writer task, no split stream: a command costs one hand-off to the
//! upstream connection and one back). Consecutive stateless commands from one
//! read go upstream as one batch of raw bytes (no copy, no re-encoding). Before
//! a client's commands move from one upstream connection to another (shared ->
//! pinned and back), the session waits until every reply of the previous one
//! has arrived, so they run in the order sent.
//!
//! Subscriptions go to the shared pub/sub hub ([`crate::upstream::pubsub`]),
//! which queues the client's confirmations and messages on a channel of their
//! own; the session puts each command's confirmations in that command's place
//! among the replies, and messages between whole replies.

use crate::command::{self, Class, Local, Pin, PubSub};
use crate::downstream::Peer;
use crate::metrics::{ErrorKind, Metrics, Route};
use crate::resp::scan::{self, CommandScanner, Limits, ScanError};
use crate::resp::{self, Proto};
use crate::secret::Secret;
use crate::upstream::conn::{Handle, PushSink, Request};
use crate::upstream::pool::{Pinned, Pool};
use crate::upstream::pubsub::{Hub, Kind, Link, ToClient};
use crate::upstream::UpstreamError;
use crate::write_queue::WriteQueue;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

/// What every session shares.
pub struct Context {
    pub pool: Arc<Pool>,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_buffered_bytes: usize,
    /// `limits.max_pubsub_queued_bytes`: also the cap on push frames
    /// (MONITOR lines, invalidations) waiting for a pinned client.
    pub max_push_bytes: usize,
    pub password: Option<Secret>,
    pub next_id: AtomicU64,
}

/// A reply owed to the client, in order.
enum Out {
    Now(Bytes),
    /// Replies to `count` commands, coming from upstream.
    Wait {
        rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
        count: usize,
        since: Instant,
        /// CLIENT REPLY OFF/SKIP: the reply is taken and dropped.
        silent: bool,
    },
    /// The confirmations of pub/sub command `seq`, queued by the hub: write
    /// the hub's frames up to them.
    Hub(u64),
}

/// Stop reading a client that owes this many replies (it is not reading them).
const MAX_OWED: usize = 1024;
/// Replies of at least this many bytes are written without a copy.
const COPY_BELOW: usize = 16 * 1024;
/// Pub/sub messages are taken from the hub's queue only while fewer bytes than
/// this wait to be written: the rest stay in that queue, where they count
/// against `limits.max_pubsub_queued_bytes`.
const HUB_WRITE_AHEAD: usize = 64 * 1024;

/// A client's byte stream, whichever listener it came from.
trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Shared,
    Pinned,
}

/// Connection state the client believes it has.
struct State {
    id: u64,
    proto: Proto,
    authed: bool,
    name: Option<Bytes>,
    db: i64,
    in_multi: bool,
    watching: bool,
    /// Sticky modes (CLIENT TRACKING/REPLY/..., MONITOR, READONLY): until RESET.
    sticky: bool,
    /// Subscriptions held for this client by the hub (as of its last answer):
    /// channels + patterns, and shard channels.
    subs: usize,
    shard_subs: usize,
    /// The hub's way to this client; made on its first pub/sub command.
    link: Option<Arc<Link>>,
    /// Number of the client's last pub/sub command.
    hub_seq: u64,
    pinned: Option<Pinned>,
    shared: Option<Handle>,
    last_target: Target,
    /// CLIENT REPLY: whether replies are written.
    reply_mode: ReplyMode,
    /// The transaction the client believes it is in (see [`Tx`]).
    tx: Tx,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReplyMode {
    On,
    Off,
    /// Drop the reply of the next command only.
    Skip,
}

/// What the proxy keeps of a client's transaction, beside the pinned
/// connection's own MULTI state.
#[derive(Default)]
struct Tx {
    /// MULTI could not be given a connection: the client is "in MULTI" with
    /// nothing upstream. Its commands are not run; EXEC answers EXECABORT.
    doomed: Option<String>,
    /// A command inside MULTI was refused by the proxy (as a command with a
    /// syntax error is by Redis): EXEC discards the transaction instead.
    abort: bool,
    /// WATCH could not be given a connection: the next transaction aborts.
    watch_failed: bool,
    /// Commands queued since MULTI (forwarded and local).
    queued: usize,
    /// Commands the proxy answers itself, queued at these positions and run
    /// when EXEC succeeds, their replies put in their place in its array.
    locals: Vec<(usize, Local, Vec<Bytes>)>,
}

impl State {
    fn subscribed(&self) -> bool {
        self.subs + self.shard_subs > 0
    }

    /// Whether the pinned connection holds state that must not be dropped.
    fn needs_pin(&self) -> bool {
        self.in_multi || self.watching || self.db != 0 || self.sticky
    }
}

/// Serve one client until it quits, errs, or `drain` fires: then no further
/// command is read, the replies of those already read are written, and the
/// connection is closed.
pub async fn run<S>(stream: S, peer: Peer, ctx: Arc<Context>, drain: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut session = Session {
        ctx: ctx.clone(),
        client: Client {
            io: Box::new(stream),
            owed: VecDeque::new(),
            waits: 0,
            out: WriteQueue::new(COPY_BELOW),
            max_out: ctx.max_buffered_bytes,
            max_push: ctx.max_push_bytes,
            owed_replies: 0,
            push: None,
            hub: None,
            inbox: BytesMut::new(),
            gone: false,
            killed: false,
            metrics: ctx.metrics.clone(),
        },
        push_tx: None,
        st: State {
            id: ctx.next_id.fetch_add(1, Ordering::Relaxed),
            proto: Proto::Resp2,
            authed: ctx.password.is_none(),
            name: None,
            db: 0,
            in_multi: false,
            watching: false,
            sticky: false,
            subs: 0,
            shard_subs: 0,
            link: None,
            hub_seq: 0,
            pinned: None,
            shared: None,
            last_target: Target::Shared,
            reply_mode: ReplyMode::On,
            tx: Tx::default(),
        },
        silent: false,
        peer,
    };
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = CommandScanner::new(ctx.limits);
    // Polled once to register for the drain, then only once it fired (a
    // cheaper check than polling its notifier at every wake-up).
    let draining = drain.clone();
    let mut drained = pin!(drain.cancelled_owned());
    let mut drain_registered = false;
    'read: loop {
        let lost = session.st.pinned.as_ref().map(|p| p.lost.clone());
        let mut lost = pin!(async move {
            match lost {
                Some(l) => l.cancelled_owned().await,
                None => std::future::pending().await,
            }
        });
        // Write what has arrived; read when the client may send more.
        let event = poll_fn(|cx| {
            let client = &mut session.client;
            client.poll_out(cx);
            if client.gone {
                return Poll::Ready(Event::Closed);
            }
            if !drain_registered || draining.is_cancelled() {
                drain_registered = true;
                if drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Closed);
                }
            }
            if lost.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Lost);
            }
            if !client.may_read() {
                return Poll::Pending;
            }
            resp::reserve_for_read(&mut buf);
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut client.io), cx, &mut buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Closed),
                Poll::Ready(Ok(n)) => Poll::Ready(Event::Read(n)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match event {
            Event::Read(n) => {
                ctx.metrics.bytes_in.inc_by(n as u64);
            }
            Event::Closed => break,
            Event::Lost => {
                // Its transaction, database or client mode went with the
                // connection: close, as a direct Redis connection would be, so
                // the client notices and reconnects. Commands in flight on it
                // already got their error replies.
                warn!(peer = %session.peer, id = session.st.id, "closing client: the upstream connection holding its state was lost");
                break;
            }
        }
        let arrived = Instant::now();
        // Stateless commands at the front of `buf` not yet sent: (bytes, count).
        let mut batch_len = 0usize;
        let mut batch_count = 0usize;
        loop {
            if !session.client.may_send(batch_count + 1) {
                // The client is not taking its replies: send nothing more for
                // it until it does (bounded by command, not by read).
                session
                    .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
                    .await;
                if !session.backpressure().await {
                    break 'read;
                }
            }
            let cmd = match scanner.scan(&buf[batch_len..]) {
                Ok(Some(cmd)) => cmd,
                Ok(None) => break,
                Err(e) => {
                    session
                        .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                    session.protocol_error(e).await;
                    break 'read;
                }
            };
            let frame = &buf[batch_len..batch_len + cmd.len];
            if cmd.argc == 0 {
                // An empty command: Redis ignores it, so do we.
                if batch_count == 0 {
                    let _ = buf.split_to(cmd.len);
                } else {
                    session
                        .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
                        .await;
                    let _ = buf.split_to(cmd.len);
                }
                continue;
            }
            if cmd.inline {
                // Telnet and redis-cli's inline form: made a RESP array (its
                // quoted words unescaped as Redis does) and handled as one.
                session
                    .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
                    .await;
                let line = buf.split_to(cmd.len);
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let converted = scan::inline_args(line).and_then(|words| {
                    let refs: Vec<&[u8]> = words.iter().map(|w| &w[..]).collect();
                    let frame = resp::command(&refs);
                    let cmd = CommandScanner::new(ctx.limits).scan(&frame)?;
                    Ok(cmd.map(|cmd| (frame, cmd)))
                });
                match converted {
                    Ok(Some((frame, cmd))) => {
                        if !session.dispatch(frame, &cmd, arrived).await {
                            break 'read;
                        }
                        session.take_inbox(&mut buf);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        session.protocol_error(e).await;
                        break 'read;
                    }
                }
                continue;
            }
            let class = session.classify(frame, &cmd);
            let batchable = class == Class::Shared
                && session.st.authed
                && session.st.pinned.is_none()
                && session.st.last_target == Target::Shared
                && session.st.reply_mode == ReplyMode::On
                && session.st.tx.doomed.is_none()
                // RESP2 subscribed mode refuses most commands: see `handle`.
                && !(session.st.proto == Proto::Resp2 && session.st.subscribed());
            if batchable {
                batch_len += cmd.len;
                batch_count += 1;
                continue;
            }
            session
                .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
                .await;
            let frame = buf.split_to(cmd.len).freeze();
            if !session.dispatch(frame, &cmd, arrived).await {
                break 'read;
            }
            session.take_inbox(&mut buf);
        }
        session
            .flush_batch(&mut buf, &mut batch_len, &mut batch_count, arrived)
            .await;
        if buf.len() > ctx.max_buffered_bytes {
            session
                .protocol_error(ScanError::Limit {
                    what: "bytes buffered for one client",
                    limit: ctx.max_buffered_bytes,
                    key: "limits.max_buffered_bytes",
                })
                .await;
            break;
        }
    }
    debug!(peer = %session.peer, id = session.st.id, "client session ended");
    if session.st.link.is_some() {
        ctx.hub.gone(session.st.id);
    }
    if session.client.killed {
        // The hub dropped this subscriber for not reading its messages (it
        // logged why): close without writing what is queued.
        return;
    }
    // Write the replies still owed (each arrives or fails), then close.
    session.settle(true).await;
}

/// What woke the session.
enum Event {
    Read(usize),
    /// End of input, a dead client connection, or a drain: stop reading.
    Closed,
    /// The pinned connection holding this client's state was lost.
    Lost,
}

struct Session {
    ctx: Arc<Context>,
    client: Client,
    /// Where pinned connections send push frames; made on first use.
    push_tx: Option<mpsc::UnboundedSender<Bytes>>,
    st: State,
    /// The command being handled gets no reply (CLIENT REPLY OFF/SKIP).
    silent: bool,
    peer: Peer,
}

/// The client connection and the replies it is owed, in order.
struct Client {
    io: Box<dyn ClientIo>,
    owed: VecDeque<Out>,
    /// `Out::Wait` entries in `owed`: replies still due from upstream.
    waits: usize,
    out: WriteQueue,
    max_out: usize,
    /// Written push frames may wait up to this many bytes (MONITOR, tracking).
    max_push: usize,
    /// Replies owed to commands sent upstream (a batch counts each command).
    owed_replies: usize,
    /// Push frames (invalidations, MONITOR lines) from the pinned connection.
    push: Option<mpsc::UnboundedReceiver<Bytes>>,
    /// What the hub queues for this client; made with its [`Link`].
    hub: Option<HubFeed>,
    /// Bytes read from the client while a blocking command waited (to notice
    /// it leaving): the session scans them next.
    inbox: BytesMut,
    /// Writing to the client failed, or it closed: it is gone.
    gone: bool,
    /// The hub dropped this client for not reading its messages: nothing more
    /// is written, and the connection closes without flushing what is queued.
    killed: bool,
    metrics: Arc<Metrics>,
}

/// What the hub queues for this client, and the count of message bytes in it.
struct HubFeed {
    rx: mpsc::UnboundedReceiver<ToClient>,
    open: bool,
    queued: Arc<AtomicUsize>,
    /// The last pub/sub command whose confirmations were queued for writing.
    done: u64,
    /// The hub's kill: polled once to register for it, then only once it
    /// fired (as the drain is).
    kill: CancellationToken,
    killed: std::pin::Pin<Box<WaitForCancellationFutureOwned>>,
    kill_registered: bool,
}

impl HubFeed {
    fn new(link: &Link, rx: mpsc::UnboundedReceiver<ToClient>) -> Self {
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

    fn is_killed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if self.kill_registered && !self.kill.is_cancelled() {
            return false;
        }
        self.kill_registered = true;
        self.killed.as_mut().poll(cx).is_ready()
    }

    /// Take the next frame from the hub into `out`; false when there is none
    /// now (the waker is then registered) or the queue is closed.
    fn take_one(
        &mut self,
        cx: &mut std::task::Context<'_>,
        out: &mut WriteQueue,
        metrics: &Metrics,
    ) -> bool {
        if !self.open {
            return false;
        }
        let bytes = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ToClient::Message(b))) => {
                self.queued.fetch_sub(b.len(), Ordering::AcqRel);
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
    /// Take more commands only while the client is taking its replies: fewer
    /// than [`MAX_OWED`] owed (counted by command, with `more` about to be
    /// sent) and less than `limits.max_buffered_bytes` waiting to be written.
    fn may_send(&self, more: usize) -> bool {
        self.owed_replies + more < MAX_OWED
            && self.owed.len() < MAX_OWED
            && self.out.queued_bytes() < self.max_out
    }

    fn may_read(&self) -> bool {
        self.may_send(0)
    }

    /// Queue the replies that have arrived, in command order, each pub/sub
    /// command's confirmations in that command's place, and push frames and
    /// pub/sub messages (only ever between whole replies); write what the
    /// socket takes. Never waits: registers for wake-up on whatever is not
    /// ready. Writes nothing more once the hub killed the client.
    fn poll_out(&mut self, cx: &mut std::task::Context<'_>) {
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
    fn queue_out(&mut self, cx: &mut std::task::Context<'_>) -> bool {
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
                } => {
                    let res = match std::pin::Pin::new(rx).poll(cx) {
                        Poll::Ready(r) => r.unwrap_or_else(|_| Err(connection_ended())),
                        Poll::Pending => break,
                    };
                    self.owed_replies -= *count;
                    if *silent {
                        self.waits -= 1;
                        self.owed.pop_front();
                        continue;
                    }
                    self.waits -= 1;
                    self.metrics
                        .command_latency
                        .observe(since.elapsed().as_secs_f64());
                    match res {
                        Ok(b) => b,
                        Err(e) => {
                            if matches!(e, UpstreamError::NoCredential { .. }) {
                                self.metrics.error(ErrorKind::NoCredential);
                            }
                            let one = e.to_reply();
                            let mut b = BytesMut::with_capacity(one.len() * *count);
                            for _ in 0..*count {
                                b.extend_from_slice(&one);
                            }
                            b.freeze()
                        }
                    }
                }
            };
            self.owed.pop_front();
            self.metrics.bytes_out.inc_by(bytes.len() as u64);
            self.out.push(bytes);
        }
        while let Some(push) = &mut self.push {
            match push.poll_recv(cx) {
                Poll::Ready(Some(p)) => {
                    self.metrics.bytes_out.inc_by(p.len() as u64);
                    self.out.push(p);
                    if self.out.queued_bytes() > self.max_push {
                        // MONITOR (or tracking) output the client does not
                        // read: cut it off, as Redis's output buffer limit does.
                        warn!(
                            limit = self.max_push,
                            "closing a client that does not read its MONITOR or tracking output (limits.max_pubsub_queued_bytes)"
                        );
                        self.metrics.error(ErrorKind::Limit);
                        self.killed = true;
                        self.gone = true;
                        return false;
                    }
                }
                Poll::Ready(None) => self.push = None,
                Poll::Pending => break,
            }
        }
        if let Some(hub) = &mut self.hub {
            // Messages (and confirmations) between whole replies, as long as
            // the client takes them.
            loop {
                if self.out.queued_bytes() >= HUB_WRITE_AHEAD {
                    return true;
                }
                if !hub.take_one(cx, &mut self.out, &self.metrics) {
                    break;
                }
            }
        }
        false
    }
}

impl Session {
    /// Where a command goes, by the routing table and what the server's own
    /// command table adds.
    fn classify(&self, frame: &[u8], cmd: &scan::Command) -> Class {
        let mut argv: [&[u8]; scan::KEPT_ARGS] = [&[]; scan::KEPT_ARGS];
        let mut argn = 0;
        for (slot, i) in argv.iter_mut().zip(0..cmd.args.len()) {
            if let Some(a) = cmd.arg(frame, i) {
                *slot = a;
                argn += 1;
            }
        }
        match command::classify(&argv[..argn]) {
            Class::Shared => self.ctx.pool.refine(argv[0]),
            class => class,
        }
    }

    /// Handle one whole command (RESP array) outside a shared batch. False
    /// ends the session.
    async fn dispatch(&mut self, frame: Bytes, cmd: &scan::Command, since: Instant) -> bool {
        let class = self.classify(&frame, cmd);
        let all_args: Vec<Bytes> = scan::args_of(&frame, cmd)
            .into_iter()
            .map(|a| frame.slice_ref(a))
            .collect();
        // Boxed: the handler's future (pinning may dial a connection) is
        // several KB, and inline it would be copied into every client's task
        // at accept (-k 0 clients pay that per command).
        Box::pin(self.handle(class, frame, &all_args, since)).await
    }

    /// Write replies until the client may send more; false if it is gone.
    async fn backpressure(&mut self) -> bool {
        let client = &mut self.client;
        poll_fn(|cx| {
            client.poll_out(cx);
            if client.gone {
                Poll::Ready(false)
            } else if client.may_send(1) {
                Poll::Ready(true)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Bytes the client sent while a blocking command waited go behind those
    /// not scanned yet.
    fn take_inbox(&mut self, buf: &mut BytesMut) {
        if !self.client.inbox.is_empty() {
            buf.extend_from_slice(&self.client.inbox);
            self.client.inbox.clear();
        }
    }

    async fn reply(&mut self, bytes: Bytes) {
        self.ctx.metrics.command(Route::Local);
        if !self.silent {
            self.client.owed.push_back(Out::Now(bytes));
        }
    }

    async fn protocol_error(&mut self, e: ScanError) {
        let kind = match e {
            ScanError::Limit { .. } => ErrorKind::Limit,
            ScanError::Protocol(_) | ScanError::Expected(_) => ErrorKind::Protocol,
        };
        self.ctx.metrics.error(kind);
        debug!(peer = %self.peer, error = %e, "closing client after bad input");
        self.client
            .owed
            .push_back(Out::Now(resp::error(&format!("ERR {e}"))));
    }

    /// Write replies (and push frames) as they arrive until every reply due
    /// from upstream has arrived; with `all`, until everything owed is written
    /// too. Ends early if the client is gone.
    async fn settle(&mut self, all: bool) {
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
    async fn wait_reply(
        &mut self,
        mut rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
    ) -> Result<Bytes, UpstreamError> {
        let client = &mut self.client;
        poll_fn(|cx| {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                return Poll::Ready(r.unwrap_or_else(|_| Err(connection_ended())));
            }
            client.poll_out(cx);
            if client.gone {
                return Poll::Ready(Err(UpstreamError::Lost {
                    reason: "client gone".into(),
                }));
            }
            Poll::Pending
        })
        .await
    }

    /// Await a blocking command's reply, also reading the client so that its
    /// leaving is noticed at once: then the pinned connection is closed, and
    /// the server drops the wait before it can hand this client (now gone) an
    /// element that another would have taken. What the client sends
    /// meanwhile is kept for the session to scan next.
    async fn wait_blocking(
        &mut self,
        mut rx: oneshot::Receiver<Result<Bytes, UpstreamError>>,
    ) -> Result<Bytes, UpstreamError> {
        const INBOX_MAX: usize = 64 * 1024;
        let client = &mut self.client;
        let res = poll_fn(|cx| loop {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                return Poll::Ready(r.unwrap_or_else(|_| Err(connection_ended())));
            }
            client.poll_out(cx);
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
        if self.client.gone {
            if let Some(p) = self.st.pinned.take() {
                debug!(peer = %self.peer, id = self.st.id, "client left while blocked; closing its upstream connection so the wait takes nothing");
                p.abort.cancel();
            }
        }
        res
    }

    async fn flush_batch(
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
        let handle = self.shared_handle();
        self.send_upstream(&handle.tx, bytes, count, count, false, arrived)
            .await;
    }

    /// The shared connection this client uses (one per client, so its
    /// commands run in the order sent), chosen on first use.
    fn shared_handle(&mut self) -> Handle {
        let proto = self.st.proto;
        let pool = &self.ctx.pool;
        self.st
            .shared
            .get_or_insert_with(|| pool.shared(proto))
            .clone()
    }

    /// Queue `bytes` on an upstream connection; `replies` replies are owed.
    async fn send_upstream(
        &mut self,
        tx: &mpsc::Sender<Request>,
        bytes: Bytes,
        count: usize,
        replies: usize,
        in_multi_after: bool,
        since: Instant,
    ) {
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
                let _ = t.send(Err(UpstreamError::Shutdown));
            }
        }
        self.client.owed.push_back(Out::Wait {
            rx: reply_rx,
            count: replies,
            since,
            silent: self.silent,
        });
        self.client.owed_replies += replies;
        self.client.waits += 1;
    }

    /// Move this client's commands to `target`, waiting for the replies still
    /// due on the other connection so that execution order is kept.
    async fn switch_to(&mut self, target: Target) {
        if self.st.last_target != target {
            self.settle(false).await;
            self.st.last_target = target;
        }
    }

    async fn ensure_pinned(&mut self) -> Result<(), UpstreamError> {
        if self.st.pinned.is_some() {
            return Ok(());
        }
        self.switch_to(Target::Pinned).await;
        let push = PushSink {
            tx: self.push_sender(),
        };
        let pinned = self.ctx.pool.pin(self.st.proto, push).await?;
        self.st.pinned = Some(pinned);
        Ok(())
    }

    /// The sender pinned connections get for push frames.
    fn push_sender(&mut self) -> mpsc::UnboundedSender<Bytes> {
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
    async fn maybe_unpin(&mut self) {
        if self.st.pinned.is_some() && !self.st.needs_pin() && self.client.waits == 0 {
            debug!(
                id = self.st.id,
                "client state cleared; releasing its pinned connection"
            );
            self.st.pinned = None;
        }
    }

    /// Handle one command that is not part of a shared batch. Returns false to
    /// close the client.
    async fn handle(&mut self, class: Class, frame: Bytes, args: &[Bytes], since: Instant) -> bool {
        if class == Class::Local(Local::ClientReply) && self.st.authed && !self.st.in_multi {
            self.client_reply(args).await;
            return true;
        }
        self.silent = match self.st.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::Skip => {
                self.st.reply_mode = ReplyMode::On;
                true
            }
        };
        let keep = self.handle_command(class, frame, args, since).await;
        self.silent = false;
        keep && !self.client.gone
    }

    /// CLIENT REPLY ON|OFF|SKIP, kept by the proxy: OFF and SKIP have no
    /// reply, ON answers +OK.
    async fn client_reply(&mut self, args: &[Bytes]) {
        let mode = args.get(2).map(|a| a.to_ascii_uppercase());
        match (args.len(), mode.as_deref()) {
            (3, Some(b"ON")) => {
                self.st.reply_mode = ReplyMode::On;
                self.reply(resp::ok()).await;
            }
            (3, Some(b"OFF")) => self.st.reply_mode = ReplyMode::Off,
            (3, Some(b"SKIP")) => {
                if self.st.reply_mode == ReplyMode::On {
                    self.st.reply_mode = ReplyMode::Skip;
                }
            }
            (3, _) => self.reply(resp::error("ERR syntax error")).await,
            _ => {
                self.reply(resp::error(
                    "ERR wrong number of arguments for 'client|reply' command",
                ))
                .await
            }
        }
    }

    /// A command while the client's MULTI has no connection: nothing runs
    /// until EXEC (EXECABORT) or DISCARD ends it.
    async fn doomed(&mut self, name: &[u8], reason: String) -> bool {
        let reply = match name {
            b"EXEC" => {
                self.st.tx = Tx::default();
                resp::error("EXECABORT Transaction discarded because of previous errors.")
            }
            b"DISCARD" => {
                self.st.tx = Tx::default();
                resp::ok()
            }
            b"QUIT" => {
                self.reply(resp::ok()).await;
                return false;
            }
            b"MULTI" => resp::error("ERR MULTI calls can not be nested"),
            _ => {
                let reply = resp::error(&format!(
                    "ERR not queued: this transaction's MULTI failed ({reason}); EXEC will discard it"
                ));
                self.st.tx.doomed = Some(reason);
                reply
            }
        };
        self.reply(reply).await;
        true
    }

    async fn handle_command(
        &mut self,
        class: Class,
        frame: Bytes,
        args: &[Bytes],
        since: Instant,
    ) -> bool {
        let name = args[0].to_ascii_uppercase();
        if let Some(reason) = self.st.tx.doomed.take() {
            if name != b"RESET" {
                return self.doomed(&name, reason).await;
            }
        }
        if !self.st.authed
            && !matches!(
                class,
                Class::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
            )
        {
            self.ctx.metrics.error(ErrorKind::ClientAuth);
            self.reply(resp::error("NOAUTH Authentication required."))
                .await;
            return true;
        }
        // RESP2 subscribed mode allows only these, as Redis does.
        if self.st.proto == Proto::Resp2 && self.st.subscribed() {
            let allowed = [
                &b"SUBSCRIBE"[..],
                b"PSUBSCRIBE",
                b"SSUBSCRIBE",
                b"UNSUBSCRIBE",
                b"PUNSUBSCRIBE",
                b"SUNSUBSCRIBE",
                b"PING",
                b"QUIT",
                b"RESET",
            ];
            if !allowed.contains(&&name[..]) {
                self.reply(resp::error(&format!(
                    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    String::from_utf8_lossy(&args[0]).to_lowercase()
                )))
                .await;
                return true;
            }
            if name == b"PING" {
                let payload = args.get(1).cloned().unwrap_or_default();
                let mut b = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
                b.extend_from_slice(&resp::bulk(&payload));
                self.reply(b.freeze()).await;
                return true;
            }
        }
        if self.st.in_multi {
            match class {
                Class::Local(
                    local @ (Local::Auth
                    | Local::ClientSetName
                    | Local::ClientGetName
                    | Local::ClientSetInfo
                    | Local::ClientId
                    | Local::ClientInfo),
                ) => {
                    // Queued as Redis queues it; run when EXEC succeeds.
                    let at = self.st.tx.queued;
                    self.st.tx.queued += 1;
                    self.st.tx.locals.push((at, local, args.to_vec()));
                    self.reply(resp::simple("QUEUED")).await;
                    return true;
                }
                Class::Local(Local::ClientReply | Local::Hello) | Class::Refuse(_) => {
                    self.st.tx.abort = true;
                    let reply = match class {
                        Class::Refuse(why) => resp::error(&format!("ERR {why}")),
                        _ => resp::error(&format!(
                            "ERR '{}' inside MULTI is not supported by redis-entra-proxy",
                            String::from_utf8_lossy(&args[0]).to_lowercase()
                        )),
                    };
                    self.reply(reply).await;
                    return true;
                }
                _ => {}
            }
        }
        match class {
            Class::Refuse(why) => {
                self.reply(resp::error(&format!("ERR {why}"))).await;
            }
            Class::Local(local) => return self.local(local, &name, frame, args, since).await,
            Class::PubSub(cmd) => return self.pubsub(cmd, args).await,
            Class::Pin(pin) => {
                if let Err(e) = self.ensure_pinned().await {
                    self.ctx.metrics.error(ErrorKind::UpstreamConnect);
                    let reason = e.to_string();
                    match pin {
                        // A transaction runs whole or not at all.
                        Pin::Transaction if !self.st.in_multi => self.st.tx.doomed = Some(reason),
                        Pin::Watch => self.st.tx.watch_failed = true,
                        _ => {}
                    }
                    self.reply(e.to_reply()).await;
                    return true;
                }
                match pin {
                    Pin::Transaction if !self.st.in_multi => {
                        self.st.in_multi = true;
                        self.ctx.metrics.command(Route::Pinned);
                        self.forward_pinned(frame, 1, since).await;
                        let watch_failed = self.st.tx.watch_failed;
                        self.st.tx = Tx {
                            abort: watch_failed,
                            ..Tx::default()
                        };
                        return true;
                    }
                    Pin::Transaction | Pin::Watch if self.st.in_multi => {
                        // Refused by the server at once (nested MULTI, WATCH
                        // inside MULTI): not queued.
                        self.ctx.metrics.command(Route::Pinned);
                        self.forward_pinned(frame, 1, since).await;
                        self.st.tx.queued -= 1;
                        return true;
                    }
                    Pin::Watch => self.st.watching = true,
                    Pin::ClientMode | Pin::Monitor | Pin::Cluster => self.st.sticky = true,
                    _ => {}
                }
                self.ctx.metrics.command(Route::Pinned);
                if pin == Pin::Blocking && !self.st.in_multi {
                    self.blocking(&name, frame, args).await;
                } else {
                    self.forward_pinned(frame, 1, since).await;
                }
            }
            Class::Shared => {
                self.maybe_unpin().await;
                if self.st.pinned.is_some() {
                    self.ctx.metrics.command(Route::Pinned);
                    self.forward_pinned(frame, 1, since).await;
                } else {
                    self.switch_to(Target::Shared).await;
                    self.ctx.metrics.command(Route::Shared);
                    let handle = self.shared_handle();
                    self.send_upstream(&handle.tx, frame, 1, 1, false, since)
                        .await;
                }
            }
        }
        true
    }

    /// A blocking command must not outlive the credential its connection is
    /// authenticated with: Azure would close the connection at expiry. Cap the
    /// server-side timeout a little before that deadline, and at two thirds of
    /// `upstream.reply_timeout` (which would otherwise end a long wait as a
    /// lost reply); when the capped call times out while the client's own
    /// timeout has not, re-issue it (by then the connection has re-AUTHed). The
    /// client sees only its own result or its own timeout.
    async fn blocking(&mut self, name: &[u8], frame: Bytes, args: &[Bytes]) {
        let Some(p) = &self.st.pinned else { return };
        let (tx, expiry) = (p.tx.clone(), p.expiry.clone());
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
            if tx.send(req).await.is_err() {
                break UpstreamError::Shutdown.to_reply();
            }
            let reply = match self.wait_blocking(reply_rx).await {
                Ok(b) => b,
                Err(e) => break e.to_reply(),
            };
            let timed_out = matches!(&reply[..], b"*-1\r\n" | b"$-1\r\n" | b"_\r\n");
            let client_done = !forever && start.elapsed() >= client_timeout;
            if !(timed_out && capped && !client_done) {
                break reply;
            }
            debug!(
                issued,
                "blocking command capped at the token deadline; re-issuing"
            );
        };
        self.reply(reply).await;
    }

    async fn forward_pinned(&mut self, frame: Bytes, count: usize, since: Instant) {
        let Some(p) = &self.st.pinned else { return };
        let tx = p.tx.clone();
        if self.st.in_multi {
            self.st.tx.queued += count;
        }
        self.send_upstream(&tx, frame, count, count, self.st.in_multi, since)
            .await;
    }

    /// The hub's way to this client, made on its first pub/sub command.
    fn link(&mut self) -> Arc<Link> {
        if let Some(link) = &self.st.link {
            return link.clone();
        }
        let (link, rx) = Link::new(self.st.id, self.peer.to_string());
        self.client.hub = Some(HubFeed::new(&link, rx));
        self.st.link = Some(link.clone());
        link
    }

    /// (P|S)SUBSCRIBE and (P|S)UNSUBSCRIBE, answered with the hub: the
    /// confirmations come as Redis sends them, in this command's place.
    async fn pubsub(&mut self, cmd: PubSub, args: &[Bytes]) -> bool {
        self.ctx.metrics.command(Route::PubSub);
        let (kind, subscribe) = match cmd {
            PubSub::Subscribe => (Kind::Channel, true),
            PubSub::PSubscribe => (Kind::Pattern, true),
            PubSub::SSubscribe => (Kind::Shard, true),
            PubSub::Unsubscribe => (Kind::Channel, false),
            PubSub::PUnsubscribe => (Kind::Pattern, false),
            PubSub::SUnsubscribe => (Kind::Shard, false),
        };
        if subscribe && args.len() < 2 {
            let reply = resp::error(&format!(
                "ERR wrong number of arguments for '{}' command",
                String::from_utf8_lossy(&args[0]).to_lowercase()
            ));
            self.client.owed.push_back(Out::Now(reply));
            return true;
        }
        if self.st.in_multi {
            let reply = resp::error(&format!(
                "ERR '{}' inside MULTI is not supported by redis-entra-proxy",
                String::from_utf8_lossy(&args[0]).to_lowercase()
            ));
            self.client.owed.push_back(Out::Now(reply));
            return true;
        }
        // Commands run in order: replies still due come before these
        // confirmations (which may be written as soon as they are queued).
        self.settle(false).await;
        self.st.hub_seq += 1;
        let seq = self.st.hub_seq;
        let names = args[1..].to_vec();
        let link = self.link();
        let hub = &self.ctx.hub;
        let res = if subscribe {
            hub.subscribe(&link, self.st.proto, kind, names, seq).await
        } else {
            hub.unsubscribe(&link, self.st.proto, kind, names, seq)
                .await
        };
        let item = match res {
            Ok(counts) => {
                self.st.subs = counts.subs;
                self.st.shard_subs = counts.shard;
                Out::Hub(seq)
            }
            Err(e) => Out::Now(e),
        };
        self.client.owed.push_back(item);
        true
    }

    async fn local(
        &mut self,
        local: Local,
        name: &[u8],
        frame: Bytes,
        args: &[Bytes],
        since: Instant,
    ) -> bool {
        match local {
            Local::Auth
            | Local::ClientSetName
            | Local::ClientGetName
            | Local::ClientSetInfo
            | Local::ClientId
            | Local::ClientInfo => {
                let reply = self.local_reply(local, args);
                self.reply(reply).await;
            }
            Local::ClientReply => self.client_reply(args).await,
            Local::Hello => self.hello(args).await,
            Local::Quit => {
                self.reply(resp::ok()).await;
                return false;
            }
            Local::Reset => {
                if self.st.pinned.is_some() || self.st.subscribed() {
                    self.settle(false).await;
                }
                if self.st.subscribed() {
                    // No message of the old subscriptions after `+RESET`.
                    self.st.hub_seq += 1;
                    let seq = self.st.hub_seq;
                    let link = self.link();
                    if self.ctx.hub.reset(&link, seq).await.is_ok() {
                        self.client.owed.push_back(Out::Hub(seq));
                    }
                    self.st.subs = 0;
                    self.st.shard_subs = 0;
                }
                self.st.pinned = None;
                self.st.in_multi = false;
                self.st.watching = false;
                self.st.sticky = false;
                self.st.tx = Tx::default();
                self.st.reply_mode = ReplyMode::On;
                self.st.db = 0;
                self.st.name = None;
                if self.st.proto != Proto::Resp2 {
                    self.st.proto = Proto::Resp2;
                    self.st.shared = None;
                }
                self.st.authed = self.ctx.password.is_none();
                self.st.last_target = Target::Shared;
                self.reply(resp::simple("RESET")).await;
            }
            Local::Select => {
                let Some(db) = args
                    .get(1)
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .and_then(|s| s.parse::<i64>().ok())
                else {
                    self.reply(resp::error("ERR value is not an integer or out of range"))
                        .await;
                    return true;
                };
                if self.st.pinned.is_none() && db == 0 {
                    self.st.db = 0;
                    self.reply(resp::ok()).await;
                    return true;
                }
                if let Err(e) = self.ensure_pinned().await {
                    self.reply(e.to_reply()).await;
                    return true;
                }
                // Optimistic: a failing SELECT (bad index) leaves db as it was on
                // the server; the client sees the server's error either way.
                self.st.db = db;
                self.ctx.metrics.command(Route::Pinned);
                self.forward_pinned(frame, 1, since).await;
            }
            Local::TxEnd => {
                if self.st.pinned.is_some() {
                    self.ctx.metrics.command(Route::Pinned);
                    if self.st.in_multi && (name == b"EXEC" || name == b"DISCARD") {
                        let tx = std::mem::take(&mut self.st.tx);
                        self.st.in_multi = false;
                        self.st.watching = false;
                        if name == b"DISCARD" {
                            self.forward_pinned(frame, 1, since).await;
                        } else if tx.abort {
                            // What Redis does with a transaction one of
                            // whose commands it refused.
                            self.forward_silently(resp::command(&[b"DISCARD"]), since)
                                .await;
                            self.reply(resp::error(
                                "EXECABORT Transaction discarded because of previous errors.",
                            ))
                            .await;
                        } else if tx.locals.is_empty() {
                            self.forward_pinned(frame, 1, since).await;
                        } else {
                            self.exec_with_locals(frame, tx).await;
                        }
                    } else {
                        if name == b"UNWATCH" {
                            self.st.watching = false;
                            self.st.tx.watch_failed = false;
                        }
                        self.forward_pinned(frame, 1, since).await;
                    }
                } else {
                    self.st.tx.watch_failed = false;
                    let reply = match name {
                        b"EXEC" => resp::error("ERR EXEC without MULTI"),
                        b"DISCARD" => resp::error("ERR DISCARD without MULTI"),
                        _ => resp::ok(),
                    };
                    self.reply(reply).await;
                }
            }
        }
        true
    }

    /// The reply of a command the proxy answers from the client's own state
    /// (now, or at EXEC when it was queued in a transaction).
    fn local_reply(&mut self, local: Local, args: &[Bytes]) -> Bytes {
        let wrong_args = |cmd: &str| {
            resp::error(&format!(
                "ERR wrong number of arguments for '{cmd}' command"
            ))
        };
        match local {
            Local::Auth => match args.len() {
                2 => self.check_password(&args[1]),
                3 => self.check_password(&args[2]),
                _ => wrong_args("auth"),
            },
            Local::ClientSetName => match args.get(2) {
                Some(n) if args.len() == 3 && !n.iter().any(|&c| c == b' ' || c == b'\n') => {
                    self.st.name = (!n.is_empty()).then(|| n.clone());
                    resp::ok()
                }
                Some(_) if args.len() == 3 => resp::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ),
                _ => wrong_args("client|setname"),
            },
            Local::ClientGetName => match &self.st.name {
                Some(n) => resp::bulk(n),
                None => resp::null(self.st.proto),
            },
            Local::ClientSetInfo if args.len() == 4 => resp::ok(),
            Local::ClientSetInfo => wrong_args("client|setinfo"),
            Local::ClientId => resp::integer(self.st.id as i64),
            Local::ClientInfo => {
                let info = format!(
                    "id={} addr={} laddr= fd=0 name={} db={} resp={} lib-name= lib-ver=\n",
                    self.st.id,
                    self.peer,
                    self.st
                        .name
                        .as_ref()
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .unwrap_or_default(),
                    self.st.db,
                    if self.st.proto == Proto::Resp3 { 3 } else { 2 },
                );
                resp::bulk(info.as_bytes())
            }
            _ => resp::error("ERR internal: not a locally answered command"),
        }
    }

    /// One command of the proxy's own on the pinned connection (nothing else
    /// owed): `Err` with the error reply to give the client if it failed.
    async fn pinned_call(&mut self, frame: Bytes) -> Result<Bytes, Bytes> {
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
            return Err(connection_ended().to_reply());
        }
        match self.wait_reply(reply_rx).await {
            Ok(b) if b.first() == Some(&b'-') || b.first() == Some(&b'!') => Err(b),
            Ok(b) => Ok(b),
            Err(e) => Err(e.to_reply()),
        }
    }

    /// Send `frame` on the pinned connection, its reply dropped.
    async fn forward_silently(&mut self, frame: Bytes, since: Instant) {
        let silent = std::mem::replace(&mut self.silent, true);
        let in_multi = std::mem::replace(&mut self.st.in_multi, false);
        self.forward_pinned(frame, 1, since).await;
        self.st.in_multi = in_multi;
        self.silent = silent;
    }

    /// EXEC of a transaction with commands the proxy answers itself: once
    /// the server's array is in, run them and put their replies in their
    /// places. A transaction that did not run (nil: a WATCH conflict, or an
    /// error) runs none of them.
    async fn exec_with_locals(&mut self, frame: Bytes, tx: Tx) {
        self.settle(false).await;
        let reply = match self.pinned_call(frame).await {
            Ok(b) if resp::array_len(&b).is_some() => {
                let mut locals = Vec::with_capacity(tx.locals.len());
                for (at, local, args) in &tx.locals {
                    locals.push((*at, self.local_reply(*local, args)));
                }
                resp::splice_array(&b, &locals).unwrap_or(b)
            }
            Ok(b) | Err(b) => b,
        };
        self.reply(reply).await;
    }

    fn check_password(&mut self, given: &[u8]) -> Bytes {
        match &self.ctx.password {
            None => {
                // No local password: accept and drop whatever the app sends
                // (often an old access key). It never goes upstream.
                self.st.authed = true;
                resp::ok()
            }
            Some(p) if constant_time_eq(p.expose().as_bytes(), given) => {
                self.st.authed = true;
                resp::ok()
            }
            Some(_) => {
                self.ctx.metrics.error(ErrorKind::ClientAuth);
                resp::error("WRONGPASS invalid username-password pair or user is disabled.")
            }
        }
    }

    async fn hello(&mut self, args: &[Bytes]) {
        let mut proto = self.st.proto;
        if let Some(v) = args.get(1) {
            match &v[..] {
                b"2" => proto = Proto::Resp2,
                b"3" => proto = Proto::Resp3,
                _ => {
                    self.reply(resp::error("NOPROTO unsupported protocol version"))
                        .await;
                    return;
                }
            }
        }
        let mut i = 2;
        let mut new_name = None;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            if opt == b"AUTH" && i + 2 < args.len() {
                let r = self.check_password(&args[i + 2]);
                if r.first() == Some(&b'-') {
                    self.reply(r).await;
                    return;
                }
                i += 3;
            } else if opt == b"SETNAME" && i + 1 < args.len() {
                new_name = Some(args[i + 1].clone());
                i += 2;
            } else {
                self.reply(resp::error(&format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                )))
                .await;
                return;
            }
        }
        if !self.st.authed {
            self.reply(resp::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")).await;
            return;
        }
        if proto != self.st.proto {
            if self.st.subscribed() || self.st.in_multi {
                self.reply(resp::error("ERR the proxy cannot change the protocol of a client that is in a transaction or subscribed; RESET first")).await;
                return;
            }
            // Replies already due come in the old protocol; wait for them.
            self.settle(false).await;
            if self.st.pinned.is_some() && self.st.needs_pin() {
                // Its state (database, tracking, ...) lives on its pinned
                // connection: that connection changes protocol with it.
                let v: &[u8] = if proto == Proto::Resp3 { b"3" } else { b"2" };
                if let Err(e) = self.pinned_call(resp::command(&[b"HELLO", v])).await {
                    self.reply(e).await;
                    return;
                }
            } else {
                self.st.pinned = None;
            }
            self.st.proto = proto;
            self.st.shared = None;
        }
        if let Some(n) = new_name {
            self.st.name = (!n.is_empty()).then_some(n);
        }
        let fields = self.ctx.pool.hello_fields();
        let get = |k: &str, default: resp::Value| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.clone())
                .unwrap_or(default)
        };
        let s = |v: &'static str| resp::Value::Str(Bytes::from_static(v.as_bytes()));
        let map = resp::map(
            proto,
            &[
                ("server", get("server", s("redis"))),
                ("version", get("version", s("7.0.0"))),
                (
                    "proto",
                    resp::Value::Int(if proto == Proto::Resp3 { 3 } else { 2 }),
                ),
                ("id", resp::Value::Int(self.st.id as i64)),
                ("mode", get("mode", s("standalone"))),
                ("role", get("role", s("master"))),
                ("modules", get("modules", resp::Value::List(vec![]))),
            ],
        );
        self.reply(map).await;
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

/// A reply channel dropped without an answer: its connection's task ended.
fn connection_ended() -> UpstreamError {
    UpstreamError::Lost {
        reason: "the upstream connection ended".into(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
