//! One authenticated upstream connection run as a task.
//!
//! Requests (raw command bytes + how many replies they owe) arrive on a channel;
//! the task writes them back to back, coalescing whatever is queued into one TLS
//! write (auto-pipelining), and a reader task hands replies back FIFO. Push frames
//! (RESP3 `>`) are out of band and go to the owner's push channel, if any. A
//! request can instead be answered by push frames (the pub/sub hub's SUBSCRIBE
//! and UNSUBSCRIBE: one `subscribe`/`unsubscribe` confirmation per channel, or
//! one error reply), and is matched in the same FIFO.
//!
//! The task also owns the connection's credential: when the token source
//! publishes a new generation it injects `AUTH <user> <token>` (after a jitter,
//! and never inside MULTI) and consumes the reply; a failed re-AUTH retires the
//! connection. Idle connections send PING so Azure does not close them.

use super::tls::{Authed, Stream};
use super::UpstreamError;
use crate::auth::TokenWatch;
use crate::metrics::Metrics;
use crate::resp::scan::ReplyScanner;
use crate::resp::{self, Proto};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

/// A re-AUTH written and awaiting its reply: (reply, generation, expiry).
type AuthWait = (
    oneshot::Receiver<Result<Bytes, UpstreamError>>,
    u64,
    Option<SystemTime>,
);

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
    Internal(oneshot::Sender<Result<Bytes, UpstreamError>>),
}

struct Inflight {
    count: usize,
    /// Confirmation push frames still owed (see [`Request::pushes`]).
    pushes: usize,
    sink: Sink,
    written_at: Instant,
}

/// Run `conn` until it fails or `rx` closes. Requests still in `rx` when the
/// connection fails stay there (never written), so a supervisor can carry them
/// to a new connection.
pub async fn run(
    conn: Authed,
    rx: &mut mpsc::Receiver<Request>,
    opts: &ConnOpts,
    push: Option<PushSink>,
    pending: &mut Option<Request>,
    expiry_out: Option<&AtomicU64>,
) -> Result<(), UpstreamError> {
    let Authed {
        stream,
        proto,
        mut generation,
        mut expires_at,
        leftover,
        ..
    } = conn;
    let publish_expiry = |e: Option<SystemTime>| {
        if let Some(out) = expiry_out {
            out.store(unix_secs(e), Ordering::Release);
        }
    };
    publish_expiry(expires_at);
    let (rd, mut wr) = tokio::io::split(stream);
    let (inflight_tx, inflight_rx) = mpsc::unbounded_channel::<Inflight>();
    let mut reader = tokio::spawn(read_loop(
        rd,
        leftover,
        inflight_rx,
        push,
        opts.reply_timeout,
    ));
    let mut tokens = opts.tokens.clone();
    tokens.mark_unchanged();
    let mut tokens_open = true;
    let mut in_multi = false;
    // A connection handed over with an older credential re-AUTHs at once.
    let mut reauth_at: Option<Instant> =
        (tokens.borrow().generation != generation).then(Instant::now);
    let mut auth_wait: Option<AuthWait> = None;
    let mut last_write = Instant::now();
    let mut buf = BytesMut::with_capacity(64 * 1024);

    let result: Result<(), UpstreamError> = loop {
        let keepalive_at = last_write + opts.keepalive;
        tokio::select! {
            // Cancel safety: `recv` loses nothing when another branch wins.
            req = async {
                match pending.take() {
                    Some(r) => Some(r),
                    None => rx.recv().await,
                }
            } => {
                let Some(req) = req else { break Ok(()) };
                buf.clear();
                let mut batch = vec![req];
                // Coalesce whatever else is queued into the same write.
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let mut big: Vec<Bytes> = Vec::new();
                let now = Instant::now();
                let mut iter = batch.into_iter();
                while let Some(req) = iter.next() {
                    let inflight = Inflight { count: req.count, pushes: req.pushes, sink: Sink::Client(req.reply), written_at: now };
                    if let Err(mpsc::error::SendError(back)) = inflight_tx.send(inflight) {
                        // The reader is gone: nothing of this request was written.
                        let Sink::Client(reply) = back.sink else { unreachable!() };
                        *pending = Some(Request { bytes: req.bytes, count: req.count, reply, in_multi_after: req.in_multi_after, pushes: req.pushes });
                        // Later ones are lost to this connection; fail them clearly.
                        for r in iter.by_ref() {
                            fail(r.reply, UpstreamError::Lost { reason: "connection closed before the command was written".into() });
                        }
                        break;
                    }
                    in_multi = req.in_multi_after;
                    if req.bytes.len() >= 64 * 1024 {
                        big.push(req.bytes);
                    } else if big.is_empty() {
                        buf.extend_from_slice(&req.bytes);
                    } else {
                        big.push(req.bytes);
                    }
                }
                if let Err(e) = write_all(&mut wr, &buf, &big).await {
                    break Err(UpstreamError::Lost { reason: format!("write failed: {e}") });
                }
                last_write = Instant::now();
                if reauth_at.is_some_and(|t| t <= last_write) && !in_multi {
                    // Due while we were busy: goes right behind this batch.
                    reauth_at = Some(last_write);
                }
            }
            res = &mut reader => {
                let err = match res {
                    Ok(e) => e,
                    Err(e) => UpstreamError::Lost { reason: format!("reader task failed: {e}") },
                };
                break Err(err);
            }
            changed = tokens.changed(), if tokens_open => {
                if changed.is_err() {
                    // The source is gone (shutdown): nothing will change any more.
                    tokens_open = false;
                    continue;
                }
                let state = tokens.borrow_and_update().clone();
                if state.generation != generation && state.current.is_some() {
                    reauth_at = Some(Instant::now() + reauth_jitter(expires_at));
                }
            }
            _ = sleep_opt(reauth_at), if reauth_at.is_some() && !in_multi && auth_wait.is_none() => {
                reauth_at = None;
                let state = tokens.borrow().clone();
                let Some(cred) = state.usable(SystemTime::now()).cloned() else { continue };
                let cmd = resp::command(&[b"AUTH", cred.username.as_bytes(), cred.password.expose().as_bytes()]);
                let (tx, rx_auth) = oneshot::channel();
                if inflight_tx.send(Inflight { count: 1, pushes: 0, sink: Sink::Internal(tx), written_at: Instant::now() }).is_err() {
                    continue;
                }
                if let Err(e) = wr.write_all(&cmd).await.and(wr.flush().await) {
                    break Err(UpstreamError::Lost { reason: format!("write failed: {e}") });
                }
                last_write = Instant::now();
                auth_wait = Some((rx_auth, state.generation, cred.expires_at));
            }
            res = async { (&mut auth_wait.as_mut().expect("guarded").0).await }, if auth_wait.is_some() => {
                let (_, gen, exp) = auth_wait.take().expect("guarded");
                match res {
                    Ok(Ok(reply)) if resp::error_text(&reply).is_none() => {
                        generation = gen;
                        expires_at = exp;
                        publish_expiry(exp);
                        opts.metrics.reauth("ok");
                        info!(kind = opts.kind, generation, "upstream connection re-authenticated");
                    }
                    Ok(Ok(reply)) => {
                        opts.metrics.reauth("failed");
                        let reason = resp::error_text(&reply).unwrap_or_default();
                        warn!(kind = opts.kind, %reason, "re-AUTH refused; retiring the connection");
                        break Err(UpstreamError::Auth { addr: opts.addr.clone(), reason });
                    }
                    Ok(Err(e)) => { opts.metrics.reauth("failed"); break Err(e) }
                    Err(_) => { opts.metrics.reauth("failed"); break Err(UpstreamError::Lost { reason: "re-AUTH reply lost".into() }) }
                }
            }
            _ = tokio::time::sleep_until(keepalive_at) => {
                // Idle: a PING keeps Azure from closing the connection.
                let (tx, _ignored) = oneshot::channel();
                if inflight_tx.send(Inflight { count: 1, pushes: 0, sink: Sink::Internal(tx), written_at: Instant::now() }).is_err() {
                    continue;
                }
                if let Err(e) = wr.write_all(b"*1\r\n$4\r\nPING\r\n").await.and(wr.flush().await) {
                    break Err(UpstreamError::Lost { reason: format!("keepalive write failed: {e}") });
                }
                last_write = Instant::now();
            }
        }
    };
    drop(inflight_tx);
    if result.is_ok() {
        // Released by the owner: wait for the last replies so none is lost.
        let _ = tokio::time::timeout(opts.reply_timeout, &mut reader).await;
    } else {
        reader.abort();
    }
    let _ = proto;
    result
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

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn fail(reply: Option<ReplyTx>, e: UpstreamError) {
    if let Some(tx) = reply {
        let _ = tx.send(Err(e));
    }
}

async fn write_all(wr: &mut WriteHalf<Stream>, small: &[u8], big: &[Bytes]) -> std::io::Result<()> {
    if !small.is_empty() {
        wr.write_all(small).await?;
    }
    for b in big {
        wr.write_all(b).await?;
    }
    wr.flush().await
}

/// Read replies and hand them out FIFO. Returns why it stopped.
async fn read_loop(
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    mut inflight: mpsc::UnboundedReceiver<Inflight>,
    push: Option<PushSink>,
    reply_timeout: Duration,
) -> UpstreamError {
    let mut scanner = ReplyScanner::new();
    let mut current: Option<Inflight> = None;
    // Replies gathered for `current` so far (bytes at the front of `buf`).
    let mut got = 0usize;
    let mut got_len = 0usize;
    let err = 'outer: loop {
        // Hand out every complete reply in the buffer.
        loop {
            let reply = match scanner.scan(&buf[got_len..]) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => break 'outer UpstreamError::Protocol(e.to_string()),
            };
            if reply.push {
                // Out of band: never part of a request's replies.
                let frame = if got_len == 0 {
                    buf.split_to(reply.len)
                } else {
                    let f = BytesMut::from(&buf[got_len..got_len + reply.len]);
                    let tail = buf.split_off(got_len + reply.len);
                    buf.truncate(got_len);
                    buf.unsplit(tail);
                    f
                }
                .freeze();
                // A pub/sub confirmation may be what the request at the head
                // of the queue is waiting for.
                if got_len == 0 && is_confirmation(&frame) {
                    if current.is_none() {
                        current = next_inflight(&mut inflight);
                    }
                    if let Some(cur) = current.as_mut().filter(|c| c.pushes > 0) {
                        cur.pushes -= 1;
                        if cur.pushes == 0 {
                            let done = current.take().expect("just checked");
                            complete(done.sink, Bytes::new());
                        }
                    }
                }
                if let Some(p) = &push {
                    let _ = p.tx.send(frame);
                }
                continue;
            }
            if current.is_none() {
                current = match next_inflight(&mut inflight) {
                    Some(i) => Some(i),
                    // A pinned connection in MONITOR mode streams lines nobody
                    // asked for: they belong to its client, like push frames.
                    None if push.is_some() && got_len == 0 => {
                        let frame = buf.split_to(reply.len).freeze();
                        if let Some(p) = &push {
                            let _ = p.tx.send(frame);
                        }
                        continue;
                    }
                    None => {
                        break 'outer UpstreamError::Protocol(
                            "reply with no command waiting for it".into(),
                        )
                    }
                };
            }
            if current.as_ref().is_some_and(|c| c.pushes > 0) {
                // A request answered by confirmations got a reply instead: its
                // error (it never has replies of its own).
                let bytes = buf.split_to(reply.len).freeze();
                let done = current.take().expect("just checked");
                complete(done.sink, bytes);
                continue;
            }
            got += 1;
            got_len += reply.len;
            let cur = current.as_ref().expect("set above");
            if got >= cur.count {
                let bytes = buf.split_to(got_len).freeze();
                let cur = current.take().expect("set above");
                complete(cur.sink, bytes);
                got = 0;
                got_len = 0;
            }
        }
        // Requests owing nothing complete as soon as they are written.
        if current.is_none() {
            current = next_inflight(&mut inflight);
        }
        let waiting = current.as_ref().map(|c| c.written_at);
        resp::reserve_for_read(&mut buf);
        let read = rd.read_buf(&mut buf);
        let n = match waiting {
            Some(since) => {
                let deadline = since + reply_timeout;
                tokio::select! {
                    r = read => r,
                    _ = tokio::time::sleep_until(deadline) => {
                        break UpstreamError::Timeout { addr: String::from("upstream"), secs: reply_timeout.as_secs_f64(), during: "waiting for a reply" };
                    }
                }
            }
            None => tokio::select! {
                r = read => r,
                // A request owing replies was written: start its timer.
                i = inflight.recv() => {
                    match i {
                        Some(i) if i.count == 0 && i.pushes == 0 => complete(i.sink, Bytes::new()),
                        Some(i) => current = Some(i),
                        None => break UpstreamError::Shutdown,
                    }
                    continue;
                }
            },
        };
        match n {
            Ok(0) => {
                break UpstreamError::Lost {
                    reason: "server closed the connection".into(),
                }
            }
            Ok(_) => {}
            Err(e) => {
                break UpstreamError::Lost {
                    reason: e.to_string(),
                }
            }
        }
    };
    info!(error = %err, "upstream connection closed");
    let lost = |e: &UpstreamError| match e {
        UpstreamError::Shutdown => UpstreamError::Lost {
            reason: "connection released".into(),
        },
        other => other.clone(),
    };
    if let Some(cur) = current.take() {
        fail_sink(cur.sink, lost(&err));
    }
    inflight.close();
    while let Ok(i) = inflight.try_recv() {
        fail_sink(i.sink, lost(&err));
    }
    err
}

/// The next request that owes something, completing on the way those that
/// owe nothing (written, answered by nothing).
fn next_inflight(inflight: &mut mpsc::UnboundedReceiver<Inflight>) -> Option<Inflight> {
    loop {
        match inflight.try_recv() {
            Ok(i) if i.count == 0 && i.pushes == 0 => complete(i.sink, Bytes::new()),
            Ok(i) => return Some(i),
            Err(_) => return None,
        }
    }
}

fn complete(sink: Sink, bytes: Bytes) {
    match sink {
        Sink::Client(Some(tx)) | Sink::Internal(tx) => {
            let _ = tx.send(Ok(bytes));
        }
        Sink::Client(None) => {}
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

fn fail_sink(sink: Sink, e: UpstreamError) {
    match sink {
        Sink::Client(reply) => fail(reply, e),
        Sink::Internal(tx) => {
            let _ = tx.send(Err(e));
        }
    }
}

/// Requests for a connection that may be replaced underneath (shared slots).
#[derive(Clone)]
pub struct Handle {
    pub tx: mpsc::Sender<Request>,
}

/// Keep one shared connection slot alive: connect (with backoff), run, and on
/// failure reconnect, carrying requests not yet written to the new connection.
/// Requests that arrive while no connection can be made fail at once with the
/// reason, so no client hangs.
pub async fn supervise_shared(
    connector: Arc<super::tls::Connector>,
    proto: Proto,
    mut rx: mpsc::Receiver<Request>,
    opts: ConnOpts,
    health: Arc<crate::admin::Health>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut attempt: u32 = 0;
    // Waiting for the first credential at startup is neither a connect error
    // nor a reconnect: those count only once a connection has been made.
    let mut ever_connected = false;
    let mut pending: Option<Request> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let conn = tokio::select! {
            c = connector.connect(proto) => c,
            _ = shutdown.cancelled() => break,
        };
        match conn {
            Ok(conn) => {
                if attempt > 0 && ever_connected {
                    opts.metrics.upstream_reconnects.inc();
                    info!(
                        kind = opts.kind,
                        ?proto,
                        "upstream connection re-established"
                    );
                }
                attempt = 0;
                ever_connected = true;
                let healthy = health.healthy_upstream();
                let up = opts.metrics.upstream(opts.kind, "up");
                up.inc();
                let res = tokio::select! {
                    r = run(conn, &mut rx, &opts, None, &mut pending, None) => r,
                    _ = shutdown.cancelled() => Ok(()),
                };
                up.dec();
                drop(healthy);
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        opts.metrics.error(crate::metrics::ErrorKind::UpstreamLost);
                        warn!(kind = opts.kind, error = %e, "upstream connection failed; reconnecting");
                    }
                }
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let no_credential = matches!(e, UpstreamError::NoCredential { .. });
                if no_credential && !ever_connected {
                    info!(
                        kind = opts.kind,
                        "upstream connection waits for the first credential"
                    );
                } else {
                    opts.metrics
                        .error(crate::metrics::ErrorKind::UpstreamConnect);
                    warn!(kind = opts.kind, error = %e, attempt, "cannot open upstream connection");
                }
                // Fail what is waiting now, and whatever arrives during the backoff.
                if let Some(r) = pending.take() {
                    fail(r.reply, e.clone());
                }
                // Without a credential there is nothing to retry until the
                // token source publishes one: wait for it instead of a timer.
                let until = Instant::now()
                    + if no_credential {
                        Duration::from_secs(3600)
                    } else {
                        backoff(attempt)
                    };
                let mut tokens = opts.tokens.clone();
                tokens.mark_unchanged();
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Some(r) => fail(r.reply, e.clone()),
                            None => return,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                        Ok(()) = tokens.changed(), if no_credential => break,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
    if let Some(r) = pending.take() {
        fail(r.reply, UpstreamError::Shutdown);
    }
}

/// Reconnect delay: exponential from 50 ms, capped at 5 s, with full jitter.
pub fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(7)))
        .min(Duration::from_secs(5));
    cap.mul_f64(0.5 + fastrand::f64() / 2.0)
}
