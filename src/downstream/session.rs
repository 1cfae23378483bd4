//! One client connection: read commands, answer the local ones, send the rest
//! upstream, and write replies back in the order the commands came.
//!
//! One task per client: it reads and routes commands, and writes each reply
//! as soon as it and every reply before it have arrived, from the same poll
//! loop (no writer task, no split stream: a command costs one hand-off to the
//! upstream connection and one back). Consecutive stateless commands from one
//! read go upstream as one batch of raw bytes (no copy, no re-encoding). Before
//! a client's commands move from one upstream connection to another (shared ->
//! pinned and back, a RESP2 and a RESP3 shared connection after HELLO or
//! RESET, a cluster node's own), the session waits until every reply of the
//! previous one has arrived, so they run in the order sent.
//!
//! Subscriptions go to the shared pub/sub hub ([`crate::upstream::pubsub`]),
//! which queues the client's confirmations and messages on a channel of their
//! own; the session puts each command's confirmations in that command's place
//! among the replies, and messages between whole replies.
//!
//! A command's way through: `resp::scan` frames it, [`crate::command`]
//! classifies it, [`crate::route::route`] decides what happens to it, and
//! this file carries the decision out. [`run`] is a short loop over named
//! steps ([`lifecycle`]): wait for an event (input, a drain, a lost
//! connection) while writing replies; take the commands of the read
//! ([`commands`]: batches, whole transactions, inline commands,
//! back-pressure); close. [`upstream`] holds the shared and pinned
//! connections and what is sent on them, [`local`] what the proxy answers
//! itself, [`blocking`] blocking commands, [`subscribe`] the hub; the replies
//! owed, in order and within their budgets, are in
//! [`super::replies`].

use super::replies::{connection_ended, Client, HubFeed, Out, OwnMessages, COPY_BELOW};

/// Commands of one read sent upstream as one batch at most: their replies
/// are handed back together, so this bounds what one piece can hold (with
/// `limits.max_buffered_bytes`, checked between pieces).
const MAX_BATCH: usize = 32;
use crate::command::{self, Class, Commands, Local, Pin, PubSub};
use crate::downstream::Peer;
use crate::metrics::{ErrorKind, Metrics, Route};
use crate::otel::ops;
use crate::resp::scan::{self, CommandScanner, Limits, ScanError};
use crate::resp::{self, Proto};
use crate::route::{rejection, route, Action, ClientView};
use crate::secret::Secret;
use crate::upstream::conn::{Handle, PushSink, Request};
use crate::upstream::pool::{Pinned, Pool};
use crate::upstream::pubsub::{Hub, Kind, Link};
use crate::upstream::UpstreamError;
use crate::write_queue::WriteQueue;

mod blocking;
mod census;
mod commands;
mod face;
mod lifecycle;
mod local;
mod lost;
mod publish;
mod subscribe;
mod upstream;
mod whole_tx;
use bytes::{Bytes, BytesMut};
use lifecycle::{Drain, Turn};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
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
    /// `listen.password`: swapped when SIGHUP re-reads `listen.password_file`.
    pub password: std::sync::RwLock<Option<Secret>>,
    pub next_id: AtomicU64,
    /// The proxy's clients, for CLIENT LIST / KILL / UNBLOCK.
    pub clients: Arc<super::clients::Clients>,
    /// The client listener's address (`laddr` in CLIENT LIST).
    pub laddr: Arc<str>,
    /// The proxy as it shows itself (cluster face, INFO's mode).
    pub face: super::face::Face,
}

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
    /// Their names, for a RESP3 client's own messages (see [`publish`]).
    names: publish::Names,
    /// The hub's way to this client; made on its first pub/sub command.
    link: Option<Arc<Link>>,
    /// Number of the client's last pub/sub command.
    hub_seq: u64,
    pinned: Option<Pinned>,
    /// The pinned connection last let go of, holding nothing of the
    /// client's, kept a moment for its next WATCH or MULTI (see
    /// [`upstream`]'s `maybe_unpin`).
    spare: Option<Spare>,
    shared: Option<Handle>,
    /// `shared` is a plain connection: a whole transaction may run on it
    /// (see [`whole_tx`]).
    shared_plain: bool,
    last_target: Target,
    /// The connection the client's last command upstream went on (see
    /// `Session::same_connection`).
    last_conn: Option<mpsc::WeakSender<Request>>,
    /// CLIENT REPLY: whether replies are written.
    reply_mode: ReplyMode,
    /// The transaction the client believes it is in (see [`Tx`]).
    tx: Tx,
    /// Its tracking is redirected to the hub's connection: cancelled when
    /// that connection goes (and the redirect with it).
    redirect_lost: Option<CancellationToken>,
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
    /// Counting commands (PUBLISH, PUBSUB NUMSUB...) queued at these
    /// positions: their counts in EXEC's array are made one Redis's.
    census: census::Queued,
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
pub async fn run<S>(
    stream: S,
    peer: Peer,
    local_addr: Option<std::net::SocketAddr>,
    ctx: Arc<Context>,
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Ended by the drain or by CLIENT KILL (see `Session::new`).
    let stop = drain.child_token();
    let mut session = Session::new(Box::new(stream), peer, local_addr, ctx, stop.clone());
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = CommandScanner::new(session.ctx.limits);
    let fired = pin!(stop.clone().cancelled_owned());
    let mut drain = Drain::new(stop, fired);
    loop {
        let event = session.next_event(&mut buf, &mut drain).await;
        match session.on_event(event) {
            Turn::Commands => {}
            Turn::Wait => continue,
            Turn::End => break,
        }
        let arrived = Instant::now();
        if !session.take_commands(&mut buf, &mut scanner, arrived).await {
            break;
        }
        if session.over_limit(&buf).await {
            break;
        }
    }
    if session.finish().await {
        // Gone from CLIENT LIST (and KILL) before the client closes its side.
        let Session {
            mut client, reg, ..
        } = session;
        drop(reg);
        client.close().await;
    }
}

/// A clean pinned connection kept for the client's next WATCH or MULTI.
struct Spare {
    pinned: Pinned,
    /// The protocol it speaks (a client that switched takes another).
    proto: Proto,
    /// When it goes back to the pool if not taken again.
    until: Instant,
}

/// How long a spare pinned connection waits for its client's next WATCH
/// or MULTI. While it waits it still counts against `upstream.max_pinned`.
const SPARE_FOR: std::time::Duration = std::time::Duration::from_millis(200);

struct Session {
    ctx: Arc<Context>,
    client: Client,
    /// Where pinned connections send push frames; made on first use.
    push_tx: Option<mpsc::UnboundedSender<Bytes>>,
    st: State,
    /// The command being handled gets no reply (CLIENT REPLY OFF/SKIP).
    silent: bool,
    /// The command name the next upstream reply is recorded under
    /// (`db.client.operation.duration`, when OpenTelemetry export is on).
    op: ops::Op,
    /// The same for the shared batch being gathered.
    batch_op: Option<ops::Op>,
    /// Counting commands in that batch, by position ([`census`]).
    census: Vec<crate::upstream::pubsub::count::Fix>,
    peer: Peer,
    /// The accepted socket's own address (`None`: a Unix socket).
    local_addr: Option<std::net::SocketAddr>,
    /// This client in the proxy's client table.
    reg: super::clients::Registration,
    /// Cancelled by CLIENT KILL (not by the drain).
    kill: CancellationToken,
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
        if super::face::claims(self.ctx.face.enabled, &argv[..argn]) {
            return Commands::face().judge_face(&argv[..argn], cmd.argc);
        }
        // A plain command is the server's to judge, except where the proxy
        // would refuse it itself: RESP2 subscribed mode. (Not a plain
        // command of a client yet to authenticate: it gets NOAUTH, and
        // nothing of it reaches the server.)
        let strict = self.st.authed && self.st.proto == Proto::Resp2 && self.st.subscribed();
        Commands::or_builtin(self.ctx.pool.learned()).judge(&argv[..argn], cmd.argc, strict)
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

    /// What CLIENT LIST shows of this client, after a command that may have
    /// changed it (not after plain reads and writes).
    fn publish(&self) {
        let st = &self.st;
        self.reg.entry.update(|s| {
            s.name = st.name.clone();
            s.db = st.db;
            s.resp = if st.proto == Proto::Resp3 { 3 } else { 2 };
            s.multi = st.in_multi;
            s.subs = st.subs;
            s.shard_subs = st.shard_subs;
        });
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
        if self.st.reply_mode == ReplyMode::Off {
            // Redis writes no reply at all then, not even this one.
            return;
        }
        self.client
            .owed
            .push_back(Out::Now(resp::error(&format!("ERR {e}"))));
    }

    /// Handle one command that is not part of a shared batch. Returns false to
    /// close the client.
    async fn handle(&mut self, class: Class, frame: Bytes, args: &[Bytes], since: Instant) -> bool {
        let name = args[0].to_ascii_uppercase();
        if self.ctx.metrics.otel().is_some() {
            self.op = ops::lookup(&name);
        }
        let view = ClientView {
            authed: self.st.authed,
            resp2_subscribed: self.st.proto == Proto::Resp2 && self.st.subscribed(),
            in_multi: self.st.in_multi,
            doomed: self.st.tx.doomed.is_some(),
            needs_pin: self.st.pinned.is_some() && self.st.needs_pin(),
        };
        let action = route(&view, class, &name);
        if action == Action::Local(Local::ClientReply) {
            // Sets whether the next replies are written: not silenced itself.
            self.client_reply(args).await;
            return true;
        }
        self.silent = match self.st.reply_mode {
            ReplyMode::On => false,
            // RESET turns replies back on before it answers (not after a
            // SKIP, which holds for the command it applies to).
            ReplyMode::Off => action != Action::Local(Local::Reset),
            ReplyMode::Skip => {
                self.st.reply_mode = ReplyMode::On;
                true
            }
        };
        let keep = self.handle_command(action, &name, frame, args, since).await;
        self.silent = false;
        if !matches!(action, Action::Shared | Action::Pinned) {
            self.publish();
        }
        keep && !self.client.gone
    }

    /// Carry out the router's decision for one command.
    async fn handle_command(
        &mut self,
        action: Action,
        name: &[u8],
        frame: Bytes,
        args: &[Bytes],
        since: Instant,
    ) -> bool {
        match action {
            Action::Doomed => {
                let reason = self.st.tx.doomed.take().unwrap_or_default();
                return self.doomed(name, reason).await;
            }
            Action::NoAuth => {
                self.ctx.metrics.error(ErrorKind::ClientAuth);
                let text = rejection(name, "NOAUTH Authentication required.");
                self.reply(resp::error(&text)).await;
            }
            Action::NotWhileSubscribed => {
                let refs: Vec<&[u8]> = args.iter().take(2).map(|a| &a[..]).collect();
                let full = Commands::or_builtin(self.ctx.pool.learned()).full_name(&refs);
                let text = rejection(name, &format!(
                    "ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                ));
                self.reply(resp::error(&text)).await;
            }
            Action::SubscribedPing if args.len() > 2 => {
                self.reply(resp::error(
                    "ERR wrong number of arguments for 'ping' command",
                ))
                .await;
            }
            Action::SubscribedPing => {
                let payload = args.get(1).cloned().unwrap_or_default();
                let mut b = BytesMut::from(&b"*2\r\n$4\r\npong\r\n"[..]);
                b.extend_from_slice(&resp::bulk(&payload));
                self.reply(b.freeze()).await;
            }
            Action::QueueLocal(local) => {
                // Queued as Redis queues it; run when EXEC succeeds.
                let at = self.st.tx.queued;
                self.st.tx.queued += 1;
                self.st.tx.locals.push((at, local, args.to_vec()));
                self.reply(resp::simple("QUEUED")).await;
            }
            Action::RefuseInMulti(why) => {
                self.st.tx.abort = true;
                let reply = match why {
                    Some(why) => resp::error(&format!("ERR {why}")),
                    None => resp::error(&format!(
                        "ERR '{}' inside MULTI is not supported by redis-entra-proxy",
                        String::from_utf8_lossy(&args[0]).to_lowercase()
                    )),
                };
                self.reply(reply).await;
            }
            Action::Refuse(why) => {
                self.reply(resp::error(&format!("ERR {why}"))).await;
            }
            Action::Reject(refusal) => {
                // Redis flags a transaction whose command it rejects.
                if self.st.in_multi {
                    self.st.tx.abort = true;
                }
                let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                let text = Commands::face().refusal_text(refusal, &refs);
                self.reply(resp::error(&rejection(name, &text))).await;
            }
            Action::Local(local) => return self.local(local, name, frame, args, since).await,
            Action::Hub(cmd) => return self.pubsub(cmd, args).await,
            Action::Pin(pin) => return self.pinned_command(pin, name, frame, args, since).await,
            Action::ServerRefuses => {
                if name == b"EXEC" && self.st.in_multi {
                    // A refused EXEC discards the transaction (and its WATCH).
                    self.st.in_multi = false;
                    self.st.watching = false;
                    self.st.tx = Tx::default();
                }
                if self.st.pinned.is_some() {
                    self.ctx.metrics.command(Route::Pinned);
                    self.forward_pinned(frame, 1, since).await;
                } else {
                    self.send_shared(frame, since).await;
                }
            }
            Action::Pinned | Action::Shared => {
                self.maybe_unpin().await;
                let queued = self.st.tx.queued;
                if self.st.pinned.is_some() {
                    self.ctx.metrics.command(Route::Pinned);
                    self.forward_pinned(frame.clone(), 1, since).await;
                } else {
                    self.send_shared(frame.clone(), since).await;
                }
                self.census_one(&frame, queued);
                self.await_own_messages(args);
            }
        }
        true
    }

    /// A command that needs the client's own connection.
    async fn pinned_command(
        &mut self,
        pin: Pin,
        name: &[u8],
        frame: Bytes,
        args: &[Bytes],
        since: Instant,
    ) -> bool {
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
        let frame = match pin {
            Pin::ClientMode => self.tracking_redirect(frame, args),
            _ => frame,
        };
        self.ctx.metrics.command(Route::Pinned);
        if pin == Pin::Blocking && !self.st.in_multi {
            self.blocking(name, frame, args).await;
        } else {
            self.forward_pinned(frame, 1, since).await;
        }
        true
    }
}
