//! The connection's protocol logic against a scripted server over an
//! in-memory pipe: reply matching, keepalive, re-AUTH, MULTI, push frames,
//! timeouts and bad bytes from the server. Time is paused and moved by hand.

use super::*;
use crate::auth::{Credential, TokenState};
use crate::resp::scan::{args_of, CommandScanner, Limits};
use crate::secret::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn state(generation: u64, password: &str) -> TokenState {
    TokenState {
        current: Some(Arc::new(Credential {
            username: format!("user{generation}"),
            password: Secret::new(password),
            expires_at: None,
        })),
        generation,
        last_error: None,
        ..TokenState::default()
    }
}

/// The server's side of the pipe: reads whole commands, writes raw bytes.
struct Server {
    io: DuplexStream,
    buf: BytesMut,
}

impl Server {
    /// The next command the connection wrote (its words).
    async fn command(&mut self) -> Vec<Vec<u8>> {
        loop {
            let mut scanner = CommandScanner::new(Limits {
                max_bulk_bytes: 1 << 20,
                max_line_bytes: 1 << 16,
                max_elements: 1024,
            });
            if let Some(cmd) = scanner.scan(&self.buf).expect("the proxy writes RESP") {
                let frame = self.buf.split_to(cmd.len);
                return args_of(&frame, &cmd).iter().map(|a| a.to_vec()).collect();
            }
            let n = self.io.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "connection closed");
        }
    }

    async fn name(&mut self) -> String {
        String::from_utf8_lossy(&self.command().await[0]).to_uppercase()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Nothing was written to the server (within a scheduler turn or two).
    async fn silent(&mut self) -> bool {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut scratch = [0u8; 1];
        let read = tokio::time::timeout(Duration::ZERO, self.io.read(&mut scratch)).await;
        read.is_err() && self.buf.is_empty()
    }
}

struct Harness {
    server: Server,
    tx: mpsc::Sender<Request>,
    tokens: watch::Sender<TokenState>,
    push: mpsc::UnboundedReceiver<Bytes>,
    task: JoinHandle<Result<(), UpstreamError>>,
    metrics: Arc<Metrics>,
}

fn start(reply_timeout: Duration, keepalive: Duration) -> Harness {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let (tokens_tx, tokens_rx) = watch::channel(state(1, "first-secret"));
    let metrics = Arc::new(Metrics::new());
    let opts = ConnOpts {
        addr: "scripted:0".into(),
        reply_timeout,
        keepalive,
        tokens: tokens_rx,
        metrics: metrics.clone(),
        kind: "shared",
    };
    let (tx, mut rx) = mpsc::channel(64);
    let (push_tx, push) = mpsc::unbounded_channel();
    let link = Link {
        stream: client_io,
        generation: 1,
        expires_at: None,
        leftover: BytesMut::new(),
    };
    let task = tokio::spawn(async move {
        let mut pending = VecDeque::new();
        run_on(
            link,
            &mut rx,
            &opts,
            Some(PushSink::new(push_tx)),
            &mut pending,
            None,
        )
        .await
        .map(|_| ())
    });
    Harness {
        server: Server {
            io: server_io,
            buf: BytesMut::new(),
        },
        tx,
        tokens: tokens_tx,
        push,
        task,
        metrics,
    }
}

impl Harness {
    async fn send(
        &self,
        args: &[&[u8]],
        count: usize,
        in_multi_after: bool,
    ) -> oneshot::Receiver<Result<Bytes, UpstreamError>> {
        let mut bytes = BytesMut::new();
        for _ in 0..count {
            bytes.extend_from_slice(&resp::command(args));
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send(Request {
                bytes: bytes.freeze(),
                count,
                reply: Some(reply_tx),
                in_multi_after,
                pushes: 0,
            })
            .await
            .unwrap();
        reply_rx
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn replies_are_matched_in_order_across_requests() {
    let mut h = start(30 * SECOND, 60 * SECOND);
    let a = h.send(&[b"GET", b"a"], 1, false).await;
    let b = h.send(&[b"INCR", b"n"], 3, false).await;
    let c = h.send(&[b"PING"], 1, false).await;
    for _ in 0..5 {
        h.server.command().await;
    }
    // Replies split at odd places, nested and of every size.
    h.server.send(b"$1\r\nx\r\n:1\r\n:2").await;
    h.server.send(b"\r\n*2\r\n$1\r\na\r\n*1\r\n:3\r\n+PO").await;
    h.server.send(b"NG\r\n").await;
    assert_eq!(&a.await.unwrap().unwrap()[..], b"$1\r\nx\r\n");
    assert_eq!(
        &b.await.unwrap().unwrap()[..],
        b":1\r\n:2\r\n*2\r\n$1\r\na\r\n*1\r\n:3\r\n"
    );
    assert_eq!(&c.await.unwrap().unwrap()[..], b"+PONG\r\n");
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_pings_and_keeps_the_pong() {
    let mut h = start(30 * SECOND, 10 * SECOND);
    tokio::time::sleep(11 * SECOND).await;
    assert_eq!(h.server.name().await, "PING");
    h.server.send(b"+PONG\r\n").await;
    // The PONG was the proxy's: the next reply is the next command's.
    let r = h.send(&[b"GET", b"k"], 1, false).await;
    assert_eq!(h.server.name().await, "GET");
    h.server.send(b"$-1\r\n").await;
    assert_eq!(&r.await.unwrap().unwrap()[..], b"$-1\r\n");
}

/// Regression (seen through the proxy: +PONG in the EXEC array): no
/// keepalive inside MULTI; once EXEC ends it, keepalive resumes.
#[tokio::test(start_paused = true)]
async fn no_keepalive_inside_multi() {
    let mut h = start(300 * SECOND, 10 * SECOND);
    let m = h.send(&[b"MULTI"], 1, true).await;
    assert_eq!(h.server.name().await, "MULTI");
    h.server.send(b"+OK\r\n").await;
    m.await.unwrap().unwrap();
    tokio::time::sleep(25 * SECOND).await;
    assert!(h.server.silent().await, "a PING was sent inside MULTI");
    let e = h.send(&[b"EXEC"], 1, false).await;
    assert_eq!(h.server.name().await, "EXEC");
    h.server.send(b"*0\r\n").await;
    e.await.unwrap().unwrap();
    tokio::time::sleep(11 * SECOND).await;
    assert_eq!(h.server.name().await, "PING");
}

#[tokio::test(start_paused = true)]
async fn a_new_credential_is_applied_after_multi_and_its_reply_consumed() {
    let mut h = start(300 * SECOND, 600 * SECOND);
    let m = h.send(&[b"MULTI"], 1, true).await;
    assert_eq!(h.server.name().await, "MULTI");
    h.server.send(b"+OK\r\n").await;
    m.await.unwrap().unwrap();
    h.tokens.send(state(2, "second-secret")).unwrap();
    // Inside MULTI the server would queue AUTH: deferred past the jitter window.
    tokio::time::sleep(40 * SECOND).await;
    assert!(h.server.silent().await, "AUTH sent inside MULTI");
    let e = h.send(&[b"EXEC"], 1, false).await;
    assert_eq!(h.server.name().await, "EXEC");
    h.server.send(b"*0\r\n").await;
    e.await.unwrap().unwrap();
    tokio::time::sleep(40 * SECOND).await;
    let auth = h.server.command().await;
    assert_eq!(auth[0], b"AUTH");
    assert_eq!(auth[1], b"user2");
    assert_eq!(auth[2], b"second-secret");
    h.server.send(b"+OK\r\n").await;
    let r = h.send(&[b"GET", b"k"], 1, false).await;
    assert_eq!(h.server.name().await, "GET");
    h.server.send(b"$1\r\nv\r\n").await;
    assert_eq!(&r.await.unwrap().unwrap()[..], b"$1\r\nv\r\n");
    let text = h.metrics.render();
    assert!(text.contains("reauths_total{outcome=\"ok\"} 1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_reauth_retires_the_connection() {
    let mut h = start(300 * SECOND, 600 * SECOND);
    h.tokens.send(state(2, "second-secret")).unwrap();
    tokio::time::sleep(40 * SECOND).await;
    assert_eq!(h.server.name().await, "AUTH");
    h.server.send(b"-WRONGPASS invalid\r\n").await;
    let res = h.task.await.unwrap();
    assert!(
        matches!(&res, Err(UpstreamError::Auth { reason, .. }) if reason.contains("WRONGPASS")),
        "{res:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reply_that_does_not_come_ends_the_connection_with_a_timeout() {
    let mut h = start(2 * SECOND, 600 * SECOND);
    let r = h.send(&[b"GET", b"k"], 1, false).await;
    assert_eq!(h.server.name().await, "GET");
    tokio::time::sleep(3 * SECOND).await;
    let res = h.task.await.unwrap();
    assert!(matches!(res, Err(UpstreamError::Timeout { .. })), "{res:?}");
    assert!(matches!(
        r.await.unwrap(),
        Err(UpstreamError::Timeout { .. })
    ));
}

/// Regression: an empty line from the server panicked the scanner, and with
/// it the connection's task. Now it is a protocol error that retires only
/// this connection, and the command in flight gets that error.
#[tokio::test(start_paused = true)]
async fn bad_bytes_from_the_server_are_an_error_not_a_panic() {
    for bad in [&b"\r\n"[..], b"*2\r\n\r\n", b"?what\r\n", b"$-2x\r\n"] {
        let mut h = start(30 * SECOND, 600 * SECOND);
        let r = h.send(&[b"GET", b"k"], 1, false).await;
        h.server.command().await;
        h.server.send(bad).await;
        let res = h.task.await.unwrap();
        assert!(
            matches!(res, Err(UpstreamError::Protocol(_))),
            "{:?}: {res:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(r.await.unwrap().is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_closes_fails_what_is_in_flight_as_lost() {
    let mut h = start(30 * SECOND, 600 * SECOND);
    let r = h.send(&[b"INCR", b"n"], 1, false).await;
    h.server.command().await;
    drop(h.server);
    let res = h.task.await.unwrap();
    assert!(matches!(res, Err(UpstreamError::Lost { .. })), "{res:?}");
    let err = r.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("may or may not have been executed"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn push_frames_and_monitor_lines_go_to_the_owner() {
    let mut h = start(30 * SECOND, 600 * SECOND);
    let r = h.send(&[b"GET", b"k"], 1, false).await;
    h.server.command().await;
    // An invalidation push before the reply, then the reply.
    h.server
        .send(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nv\r\n")
        .await;
    assert_eq!(&r.await.unwrap().unwrap()[..], b"$1\r\nv\r\n");
    assert_eq!(
        &h.push.recv().await.unwrap()[..],
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    );
    // With nothing in flight (MONITOR), lines belong to the owner too.
    h.server
        .send(b"+1700000000.1 [0 1.2.3.4:5] \"GET\"\r\n")
        .await;
    assert!(h.push.recv().await.unwrap().starts_with(b"+1700000000.1"));
}

#[tokio::test(start_paused = true)]
async fn released_connections_finish_their_replies_then_end() {
    let mut h = start(30 * SECOND, 600 * SECOND);
    let r = h.send(&[b"GET", b"k"], 1, false).await;
    h.server.command().await;
    drop(h.tx);
    h.server.send(b"$1\r\nv\r\n").await;
    assert_eq!(&r.await.unwrap().unwrap()[..], b"$1\r\nv\r\n");
    assert!(matches!(h.task.await.unwrap(), Ok(())));
}

#[tokio::test]
async fn a_panicking_task_becomes_an_error() {
    let n = std::hint::black_box(1);
    let got = catch_panic(Box::pin(async move {
        if n == 1 {
            panic!("boom at {n}");
        }
        7
    }))
    .await;
    assert_eq!(got, Err("boom at 1".to_string()));
    let ok = catch_panic(Box::pin(async { 7 })).await;
    assert_eq!(ok, Ok(7));
}

/// What a shared connection's task ends with: its result, what it left
/// for the next connection, and how many of those were sent again.
type SharedEnd = JoinHandle<(
    Result<(), UpstreamError>,
    VecDeque<Request>,
    usize,
    mpsc::Receiver<Request>,
)>;

/// A shared connection run with resending on, over a pipe.
fn start_shared(
    resent_before: usize,
    pending_before: Vec<Request>,
) -> (Server, mpsc::Sender<Request>, SharedEnd) {
    start_shared_with(resent_before, pending_before, None)
}

fn start_shared_with(
    resent_before: usize,
    pending_before: Vec<Request>,
    maint: Option<watch::Receiver<Maint>>,
) -> (Server, mpsc::Sender<Request>, SharedEnd) {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let (_tokens_tx, tokens_rx) = watch::channel(state(1, "first-secret"));
    let opts = ConnOpts {
        addr: "scripted:0".into(),
        reply_timeout: 30 * SECOND,
        keepalive: 60 * SECOND,
        tokens: tokens_rx,
        metrics: Arc::new(Metrics::new()),
        kind: "shared",
    };
    let (tx, mut rx) = mpsc::channel(64);
    let link = Link {
        stream: client_io,
        generation: 1,
        expires_at: None,
        leftover: BytesMut::new(),
    };
    let task = tokio::spawn(async move {
        let _keep = _tokens_tx;
        let mut pending: VecDeque<Request> = pending_before.into();
        let mut resent = resent_before;
        let side = SharedSide { maint, push: None };
        let r = run_shared_on(link, &mut rx, &opts, &mut pending, &mut resent, side).await;
        (r, pending, resent, rx)
    });
    let server = Server {
        io: server_io,
        buf: BytesMut::new(),
    };
    (server, tx, task)
}

fn request(args: &[&[u8]]) -> (Request, oneshot::Receiver<Result<Bytes, UpstreamError>>) {
    let (reply_tx, reply_rx) = oneshot::channel();
    let req = Request {
        bytes: resp::command(args),
        count: 1,
        reply: Some(reply_tx),
        in_multi_after: false,
        pushes: 0,
    };
    (req, reply_rx)
}

#[tokio::test(start_paused = true)]
async fn a_lost_shared_connection_gives_back_its_reads_in_flight_and_fails_its_writes() {
    let (mut server, tx, task) = start_shared(0, Vec::new());
    let (r1, mut a) = request(&[b"GET", b"a"]);
    let (w2, b) = request(&[b"SET", b"b", b"1"]);
    let (r3, mut c) = request(&[b"MGET", b"c", b"d"]);
    for r in [r1, w2, r3] {
        tx.send(r).await.unwrap();
    }
    for _ in 0..3 {
        server.command().await;
    }
    drop(server);
    let (res, pending, resent, _) = task.await.unwrap();
    assert!(matches!(res, Err(UpstreamError::Lost { .. })), "{res:?}");
    // The write may have run: its error says so. The reads go again, in order.
    let e = b.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("may or may not have been executed"), "{e}");
    assert!(a.try_recv().is_err(), "the first read still waits");
    assert!(c.try_recv().is_err(), "the second read still waits");
    assert_eq!(resent, 2);
    assert_eq!(pending.len(), 2);
    assert_eq!(&pending[0].bytes[..], &resp::command(&[b"GET", b"a"])[..]);
    assert_eq!(
        &pending[1].bytes[..],
        &resp::command(&[b"MGET", b"c", b"d"])[..]
    );
}

#[tokio::test(start_paused = true)]
async fn a_command_sent_again_is_not_sent_a_third_time() {
    let (again, again_rx) = request(&[b"GET", b"a"]);
    let (fresh, _fresh_rx) = request(&[b"GET", b"b"]);
    let (mut server, _tx, task) = start_shared(1, vec![again, fresh]);
    server.command().await;
    server.command().await;
    drop(server);
    let (_, pending, resent, _) = task.await.unwrap();
    let e = again_rx.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("may or may not have been executed"), "{e}");
    // The other one was sent once: it may go again, once.
    assert_eq!(resent, 1);
    assert_eq!(&pending[0].bytes[..], &resp::command(&[b"GET", b"b"])[..]);
}

#[tokio::test(start_paused = true)]
async fn a_reply_timeout_sends_nothing_again() {
    let (mut server, tx, task) = start_shared(0, Vec::new());
    let (r1, a) = request(&[b"GET", b"a"]);
    tx.send(r1).await.unwrap();
    server.command().await;
    tokio::time::advance(31 * SECOND).await;
    let (res, pending, resent, _) = task.await.unwrap();
    assert!(matches!(res, Err(UpstreamError::Timeout { .. })), "{res:?}");
    assert!(a.await.unwrap().is_err());
    assert_eq!((pending.len(), resent), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_drain_stops_new_commands_and_lets_the_replies_in_flight_come() {
    let (signal, maint) = watch::channel(Maint::default());
    let (mut server, tx, task) = start_shared_with(0, Vec::new(), Some(maint));
    let (r1, a) = request(&[b"SET", b"a", b"1"]);
    tx.send(r1).await.unwrap();
    assert_eq!(server.name().await, "SET");
    // A close is announced: the connection takes nothing more.
    signal.send_modify(|m| m.drain_before = Some(Instant::now() + SECOND));
    let (r2, _b) = request(&[b"SET", b"b", b"2"]);
    tx.send(r2).await.unwrap();
    assert!(
        server.silent().await,
        "a command went into a draining connection"
    );
    // The reply in flight still comes.
    server.send(b"+OK\r\n").await;
    assert_eq!(&a.await.unwrap().unwrap()[..], b"+OK\r\n");
    // The server closes it: nothing was in flight; the waiting command was
    // never written and waits (taken, or still in the slot's channel) for
    // the next connection.
    drop(server);
    let (res, pending, resent, mut rx) = task.await.unwrap();
    assert!(res.is_err());
    assert_eq!(resent, 0);
    let mut queued = 0;
    while rx.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(pending.len() + queued, 1);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_ends_without_a_close_lets_commands_through_again() {
    let (signal, maint) = watch::channel(Maint::default());
    let (mut server, tx, _task) = start_shared_with(0, Vec::new(), Some(maint));
    signal.send_modify(|m| m.drain_before = Some(Instant::now() + SECOND));
    let (r1, a) = request(&[b"GET", b"a"]);
    tx.send(r1).await.unwrap();
    assert!(server.silent().await);
    signal.send_modify(|m| m.drain_before = None);
    assert_eq!(server.name().await, "GET");
    server.send(b"$1\r\n1\r\n").await;
    assert_eq!(&a.await.unwrap().unwrap()[..], b"$1\r\n1\r\n");
}

#[tokio::test(start_paused = true)]
async fn a_refresh_retires_the_connection_once_its_replies_are_in() {
    let (signal, maint) = watch::channel(Maint::default());
    let (mut server, tx, task) = start_shared_with(0, Vec::new(), Some(maint));
    let (r1, a) = request(&[b"GET", b"a"]);
    tx.send(r1).await.unwrap();
    server.command().await;
    tokio::time::advance(SECOND).await;
    signal.send_modify(|m| m.retire_before = Some(Instant::now()));
    let (r2, _b) = request(&[b"GET", b"b"]);
    tx.send(r2).await.unwrap();
    assert!(server.silent().await);
    assert!(!task.is_finished(), "retired with a reply owed");
    server.send(b"$1\r\n1\r\n").await;
    assert_eq!(&a.await.unwrap().unwrap()[..], b"$1\r\n1\r\n");
    // Ends cleanly; the command waiting was never written.
    let (res, _, _, _) = task.await.unwrap();
    assert!(res.is_ok(), "{res:?}");
}

#[tokio::test(start_paused = true)]
async fn a_relaxed_connection_waits_longer_for_its_replies() {
    let (signal, maint) = watch::channel(Maint::default());
    let (mut server, tx, task) = start_shared_with(0, Vec::new(), Some(maint));
    // FAILING_OVER for 20 s: a reply may come up to 20 s + the reply timeout.
    signal.send_modify(|m| m.relax_until = Some(Instant::now() + 20 * SECOND));
    let (r1, a) = request(&[b"GET", b"a"]);
    tx.send(r1).await.unwrap();
    server.command().await;
    tokio::time::advance(45 * SECOND).await;
    assert!(!task.is_finished(), "timed out within the relaxed window");
    server.send(b"$1\r\n1\r\n").await;
    assert_eq!(&a.await.unwrap().unwrap()[..], b"$1\r\n1\r\n");
    // Restored: the usual timeout again.
    signal.send_modify(|m| m.relax_until = None);
    let (r2, b) = request(&[b"GET", b"b"]);
    tx.send(r2).await.unwrap();
    server.command().await;
    tokio::time::advance(31 * SECOND).await;
    assert!(b.await.unwrap().is_err());
    let (res, _, _, _) = task.await.unwrap();
    assert!(matches!(res, Err(UpstreamError::Timeout { .. })), "{res:?}");
}
