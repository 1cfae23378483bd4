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
use tokio::sync::{mpsc, oneshot, watch};
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
    /// Also send an empty frame (a mark) just before each reply handed to a
    /// request's sender: the owner then knows which push frames the server
    /// wrote before that reply (a tracking invalidation Redis sends before a
    /// command's reply must reach the client before it).
    pub marks: bool,
}

impl PushSink {
    /// Push frames only.
    pub fn new(tx: mpsc::UnboundedSender<Bytes>) -> PushSink {
        PushSink { tx, marks: false }
    }

    /// Push frames, and a mark before each reply (see [`PushSink::marks`]).
    pub fn marked(tx: mpsc::UnboundedSender<Bytes>) -> PushSink {
        PushSink { tx, marks: true }
    }

    /// The mark [`PushSink::marked`] sends: no push frame is empty.
    pub fn is_mark(frame: &[u8]) -> bool {
        frame.is_empty()
    }
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

/// [`run`] for a shared connection, which also sends again what cannot have
/// changed anything: when the connection is lost, the read-only requests in
/// flight that [`maintenance::retry::resend_plan`] allows are put at the
/// front of `pending` (before those never written), for the next
/// connection, and `resent` says how many. Requests at the front of
/// `pending` that were sent again already (`resent` of them when called)
/// are not sent a third time: if lost again, they get the error.
pub async fn run_shared(
    conn: Authed,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    pending: &mut VecDeque<Request>,
    resent: &mut usize,
    side: SharedSide,
) -> Result<(), UpstreamError> {
    let link = Link {
        stream: conn.stream,
        generation: conn.generation,
        expires_at: conn.expires_at,
        leftover: conn.leftover,
    };
    run_shared_on(link, rx, opts, pending, resent, side).await
}

/// What a shared connection follows besides its requests.
#[derive(Default)]
pub struct SharedSide {
    /// The pool's maintenance signal.
    pub maint: Option<watch::Receiver<Maint>>,
    /// Where the server's push frames go (RESP3 maintenance pushes); never
    /// a reply: on a shared connection a reply nobody asked for is an error.
    pub push: Option<PushSink>,
}

/// [`run_shared`] over any stream.
pub async fn run_shared_on<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: Link<S>,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    pending: &mut VecDeque<Request>,
    resent: &mut usize,
    side: SharedSide,
) -> Result<(), UpstreamError> {
    let shared = Shared {
        resent,
        maint: side.maint,
    };
    run_guarded(link, rx, opts, side.push, pending, None, Some(shared))
        .await
        .map(|_| ())
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
    run_guarded(link, rx, opts, push, pending, expiry_out, None).await
}

/// What only a shared connection has: resending (see [`run_shared`]) and
/// the maintenance signal.
struct Shared<'a> {
    resent: &'a mut usize,
    maint: Option<watch::Receiver<Maint>>,
}

async fn run_guarded<S: AsyncRead + AsyncWrite + Unpin + Send>(
    link: Link<S>,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut VecDeque<Request>,
    expiry_out: Option<&AtomicU64>,
    shared: Option<Shared<'_>>,
) -> Result<Option<Released<S>>, UpstreamError> {
    let task = Box::pin(machine::run_inner(
        link, rx, opts, push, pending, expiry_out, shared,
    ));
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

/// A maintenance signal for a pool's shared connections (set by the
/// `AzureRedisEvents` listener, [`events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maint {
    /// Connections opened before this take no new commands (they finish
    /// what is in flight) until it is cleared: a close is announced.
    pub drain_before: Option<Instant>,
    /// Connections opened before this take no new commands and end once
    /// their replies are in; their slot dials a new one.
    pub retire_before: Option<Instant>,
    /// The node is busy moving or failing over until then (a `MIGRATING` or
    /// `FAILING_OVER` push): a reply is overdue only a reply timeout after it.
    pub relax_until: Option<Instant>,
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

pub use supervisor::{supervise_shared, Slot, Superseded};

pub mod events;
mod machine;
mod pushes;

/// Reconnect delay: exponential from 50 ms, capped at 5 s, with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(7)))
        .min(Duration::from_secs(5));
    cap.mul_f64(0.5 + fastrand::f64() / 2.0)
}

mod supervisor;
#[cfg(test)]
mod tests;
