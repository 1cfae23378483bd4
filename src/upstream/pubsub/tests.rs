//! The hub's registry against a scripted upstream: the test plays the
//! connection's supervisor (Connected / Lost / ConnectFailed), reads the
//! requests the hub writes, and answers them with the push frames or errors a
//! RESP3 Redis sends.

use super::*;
use crate::resp;
use bytes::BytesMut;
use std::sync::atomic::Ordering;

const T: Duration = Duration::from_secs(5);

struct Fixture {
    hub: Hub,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<Event>,
    /// The connections the hub asks for after the first (cluster primaries).
    starts: mpsc::UnboundedReceiver<Start>,
}

/// A hub with a cap of `max_queued` message bytes per client, and the channel
/// its upstream's events go to (handed over when the hub starts it).
async fn hub(max_queued: usize) -> Fixture {
    let metrics = Arc::new(Metrics::new());
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let starter: Starter = Box::new(move |s| {
        let _ = started_tx.send(s);
    });
    let hub = Hub::with_upstream(
        HubOpts {
            max_queued_bytes: max_queued,
            op_timeout: Duration::from_secs(30),
            addr: "upstream:6380".into(),
            resub: None,
        },
        metrics.clone(),
        starter,
        CancellationToken::new(),
    );
    // Nothing is dialled until someone subscribes: kick it with a first client.
    let (probe, _rx) = Link::new(999, "probe".into());
    let h = hub.clone();
    let first = tokio::spawn(async move {
        h.subscribe(&probe, Proto::Resp3, Kind::Channel, vec![b("warmup")], 1)
            .await
    });
    let start = tokio::time::timeout(T, started_rx.recv())
        .await
        .expect("the hub starts its upstream on the first SUBSCRIBE")
        .unwrap();
    assert_eq!((start.conn, start.node.as_ref()), (0, None));
    let events = start.events;
    // Fail that first subscription so the fixture starts from nothing.
    events
        .send(Event::ConnectFailed {
            conn: 0,
            error: UpstreamError::Connect {
                addr: "upstream:6380".into(),
                reason: "not yet".into(),
            },
        })
        .unwrap();
    let r = first.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    Fixture {
        hub,
        metrics,
        events,
        starts: started_rx,
    }
}

/// One of the hub's connections, played by the test.
struct Upstream {
    conn: usize,
    epoch: u64,
    requests: mpsc::Receiver<Request>,
    events: mpsc::UnboundedSender<Event>,
}

impl Upstream {
    fn connect(f: &Fixture, epoch: u64) -> Upstream {
        Upstream::connect_to(&f.events, 0, epoch)
    }

    fn connect_to(events: &mpsc::UnboundedSender<Event>, conn: usize, epoch: u64) -> Upstream {
        let (req_tx, requests) = mpsc::channel(1024);
        events
            .send(Event::Connected {
                conn,
                epoch,
                requests: req_tx,
            })
            .unwrap();
        Upstream {
            conn,
            epoch,
            requests,
            events: events.clone(),
        }
    }

    fn lose(&self) {
        self.events
            .send(Event::Lost {
                conn: self.conn,
                epoch: self.epoch,
            })
            .unwrap();
    }

    /// The next command the hub writes, as words.
    async fn next(&mut self) -> (Vec<String>, Request) {
        let req = tokio::time::timeout(T, self.requests.recv())
            .await
            .expect("a request")
            .expect("connection open");
        assert_eq!((req.count, req.pushes), (0, 1));
        (words(&req.bytes), req)
    }

    /// No command written within a moment.
    async fn nothing(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(100), self.requests.recv()).await;
        if let Ok(Some(req)) = r {
            panic!("unexpected request {:?}", words(&req.bytes));
        }
    }

    /// What Redis pushes on a RESP3 connection.
    fn push(&self, parts: &[&str], count: Option<usize>) {
        let mut f = BytesMut::new();
        f.extend_from_slice(format!(">{}\r\n", parts.len() + count.is_some() as usize).as_bytes());
        for p in parts {
            f.extend_from_slice(&resp::bulk(p.as_bytes()));
        }
        if let Some(c) = count {
            f.extend_from_slice(format!(":{c}\r\n").as_bytes());
        }
        self.events
            .send(Event::Push {
                conn: self.conn,
                epoch: self.epoch,
                frame: f.freeze(),
            })
            .unwrap();
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn words(cmd: &[u8]) -> Vec<String> {
    let mut scanner = crate::resp::scan::CommandScanner::new(crate::resp::scan::Limits {
        max_bulk_bytes: 1 << 20,
        max_line_bytes: 1 << 16,
        max_elements: 1 << 16,
    });
    let c = scanner.scan(cmd).unwrap().unwrap();
    crate::resp::scan::args_of(cmd, &c)
        .into_iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The next frame queued for a client.
async fn frame(rx: &mut mpsc::UnboundedReceiver<ToClient>) -> ToClient {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a frame for the client")
        .expect("channel open")
}

async fn reply(rx: &mut mpsc::UnboundedReceiver<ToClient>, seq: u64) -> String {
    match frame(rx).await {
        ToClient::Reply { bytes, seq: s } => {
            assert_eq!(s, seq);
            String::from_utf8_lossy(&bytes).into_owned()
        }
        ToClient::Message(m) => panic!("expected confirmations, got {m:?}"),
    }
}

async fn message(rx: &mut mpsc::UnboundedReceiver<ToClient>) -> String {
    match frame(rx).await {
        ToClient::Message(m) => String::from_utf8_lossy(&m).into_owned(),
        ToClient::Reply { bytes, .. } => panic!("expected a message, got {bytes:?}"),
    }
}

fn quiet(rx: &mut mpsc::UnboundedReceiver<ToClient>) {
    if let Ok(f) = rx.try_recv() {
        panic!("unexpected frame {f:?}");
    }
}

/// Run a hub call in the background (it waits for the fake upstream).
fn spawn_op<F>(f: F) -> tokio::task::JoinHandle<OpResult>
where
    F: std::future::Future<Output = OpResult> + Send + 'static,
{
    tokio::spawn(f)
}

async fn subscribe_bg(
    f: &Fixture,
    link: &Arc<Link>,
    proto: Proto,
    kind: Kind,
    names: &[&str],
    seq: u64,
) -> tokio::task::JoinHandle<OpResult> {
    let (h, l) = (f.hub.clone(), link.clone());
    let names: Vec<Bytes> = names.iter().map(|n| b(n)).collect();
    let task = spawn_op(async move { h.subscribe(&l, proto, kind, names, seq).await });
    // Let the hub take it in before the test goes on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    task
}

async fn done(t: tokio::task::JoinHandle<OpResult>) -> OpResult {
    tokio::time::timeout(T, t).await.expect("answered").unwrap()
}

#[tokio::test]
async fn one_upstream_subscription_for_many_clients_and_unsubscribe_with_the_last() {
    let f = hub(1 << 20).await;
    let mut up = Upstream::connect(&f, 1);
    let (a, mut a_rx) = Link::new(1, "a".into());
    let (c, mut c_rx) = Link::new(2, "c".into());
    let first = subscribe_bg(&f, &a, Proto::Resp2, Kind::Channel, &["news"], 1).await;
    let (cmd, _req) = up.next().await;
    assert_eq!(cmd, ["SUBSCRIBE", "news"]);
    // Not confirmed to the client before the server confirmed it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!first.is_finished());
    quiet(&mut a_rx);
    up.push(&["subscribe", "news"], Some(1));
    assert_eq!(done(first).await, Ok(Counts { subs: 1, shard: 0 }));
    assert_eq!(
        reply(&mut a_rx, 1).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(f.metrics.pubsub_channels.get(), 1);

    // A second subscriber (RESP3) shares it: nothing goes upstream.
    let r = f
        .hub
        .subscribe(&c, Proto::Resp3, Kind::Channel, vec![b("news")], 1)
        .await;
    assert_eq!(r, Ok(Counts { subs: 1, shard: 0 }));
    assert_eq!(
        reply(&mut c_rx, 1).await,
        ">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    up.nothing().await;

    // A message reaches both, each in its protocol.
    up.push(&["message", "news", "hello"], None);
    assert_eq!(
        message(&mut a_rx).await,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    assert_eq!(
        message(&mut c_rx).await,
        ">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );
    // Counted until the client's session takes them off.
    assert_eq!(a.queued.load(Ordering::Acquire), 38);

    // The first one leaving keeps the upstream subscription.
    let r = f
        .hub
        .unsubscribe(&a, Proto::Resp2, Kind::Channel, vec![], 2)
        .await;
    assert_eq!(r, Ok(Counts::default()));
    assert_eq!(
        reply(&mut a_rx, 2).await,
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n"
    );
    up.nothing().await;
    up.push(&["message", "news", "again"], None);
    assert!(message(&mut c_rx).await.contains("again"));
    quiet(&mut a_rx);
    // The last one leaving (by disconnecting) ends it.
    f.hub.gone(2);
    let (cmd, _req) = up.next().await;
    assert_eq!(cmd, ["UNSUBSCRIBE", "news"]);
    assert_eq!(f.metrics.pubsub_channels.get(), 1);
    up.push(&["unsubscribe", "news"], Some(0));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.metrics.pubsub_channels.get(), 0);
}

#[tokio::test]
async fn counts_and_frames_follow_redis() {
    let f = hub(1 << 20).await;
    let mut up = Upstream::connect(&f, 1);
    let (a, mut rx) = Link::new(1, "a".into());
    // Nothing subscribed: one frame with a null channel.
    let r = f
        .hub
        .unsubscribe(&a, Proto::Resp2, Kind::Pattern, vec![], 1)
        .await;
    assert_eq!(r, Ok(Counts::default()));
    assert_eq!(
        reply(&mut rx, 1).await,
        "*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n"
    );
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Channel, &["a", "b", "a"], 2).await;
    for n in ["a", "b"] {
        let (cmd, _r) = up.next().await;
        assert_eq!(cmd, ["SUBSCRIBE", n]);
        up.push(&["subscribe", n], Some(1));
    }
    assert_eq!(done(t).await, Ok(Counts { subs: 2, shard: 0 }));
    assert_eq!(
        reply(&mut rx, 2).await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:2\r\n"
    );
    // Patterns count with channels; shard channels on their own.
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Pattern, &["p*"], 3).await;
    let (cmd, _r) = up.next().await;
    assert_eq!(cmd, ["PSUBSCRIBE", "p*"]);
    up.push(&["psubscribe", "p*"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 3, shard: 0 }));
    assert!(reply(&mut rx, 3).await.ends_with(":3\r\n"));
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Shard, &["s"], 4).await;
    let (cmd, _r) = up.next().await;
    assert_eq!(cmd, ["SSUBSCRIBE", "s"]);
    up.push(&["ssubscribe", "s"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 3, shard: 1 }));
    assert_eq!(
        reply(&mut rx, 4).await,
        "*3\r\n$10\r\nssubscribe\r\n$1\r\ns\r\n:1\r\n"
    );
    // Unsubscribing a channel it does not have still answers, with its count.
    let r = f
        .hub
        .unsubscribe(&a, Proto::Resp2, Kind::Channel, vec![b("zz")], 5)
        .await;
    assert_eq!(r, Ok(Counts { subs: 3, shard: 1 }));
    assert_eq!(
        reply(&mut rx, 5).await,
        "*3\r\n$11\r\nunsubscribe\r\n$2\r\nzz\r\n:3\r\n"
    );
    // All channels, in the order they were subscribed.
    let r = f
        .hub
        .unsubscribe(&a, Proto::Resp2, Kind::Channel, vec![], 6)
        .await;
    assert_eq!(r, Ok(Counts { subs: 1, shard: 1 }));
    assert_eq!(
        reply(&mut rx, 6).await,
        "*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n"
    );
    let mut sent: Vec<Vec<String>> = vec![up.next().await.0, up.next().await.0];
    sent.sort();
    assert_eq!(sent, [["UNSUBSCRIBE", "a"], ["UNSUBSCRIBE", "b"]]);
    // RESET: no frame, everything dropped.
    let r = f.hub.reset(&a, 7).await;
    assert_eq!(r, Ok(Counts::default()));
    assert_eq!(reply(&mut rx, 7).await, "");
    let mut sent: Vec<Vec<String>> = vec![up.next().await.0, up.next().await.0];
    sent.sort();
    assert_eq!(sent, [["PUNSUBSCRIBE", "p*"], ["SUNSUBSCRIBE", "s"]]);
}

#[tokio::test]
async fn messages_of_confirmed_channels_wait_for_the_rest_of_a_subscribe() {
    let f = hub(1 << 20).await;
    let mut up = Upstream::connect(&f, 1);
    let (a, mut a_rx) = Link::new(1, "a".into());
    let (c, mut c_rx) = Link::new(2, "c".into());
    let t = subscribe_bg(&f, &a, Proto::Resp3, Kind::Channel, &["x"], 1).await;
    let _ = up.next().await;
    up.push(&["subscribe", "x"], Some(1));
    done(t).await.unwrap();
    let _ = reply(&mut a_rx, 1).await;
    // c wants x (already there) and y (not yet).
    let t = subscribe_bg(&f, &c, Proto::Resp3, Kind::Channel, &["x", "y"], 1).await;
    let (cmd, _r) = up.next().await;
    assert_eq!(cmd, ["SUBSCRIBE", "y"]);
    up.push(&["message", "x", "early"], None);
    assert!(message(&mut a_rx).await.contains("early"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    quiet(&mut c_rx);
    up.push(&["subscribe", "y"], Some(2));
    assert_eq!(done(t).await, Ok(Counts { subs: 2, shard: 0 }));
    // Its confirmations first, then what it would have seen had it been there.
    assert_eq!(
        reply(&mut c_rx, 1).await,
        ">3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:1\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\ny\r\n:2\r\n"
    );
    assert!(message(&mut c_rx).await.contains("early"));
}

#[tokio::test]
async fn a_refused_subscribe_gives_the_error_and_leaves_nothing_behind() {
    let f = hub(1 << 20).await;
    let mut up = Upstream::connect(&f, 1);
    let (a, mut rx) = Link::new(1, "a".into());
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Channel, &["ok", "secret"], 1).await;
    let (cmd, _ok) = up.next().await;
    assert_eq!(cmd, ["SUBSCRIBE", "ok"]);
    let (cmd, secret) = up.next().await;
    assert_eq!(cmd, ["SUBSCRIBE", "secret"]);
    up.push(&["subscribe", "ok"], Some(1));
    let err =
        b"-NOPERM this user has no permissions to access one of the channels used as arguments\r\n";
    let _ = secret.reply.unwrap().send(Ok(Bytes::from_static(err)));
    assert_eq!(done(t).await, Err(Bytes::from_static(err)));
    // No confirmation reached the client, and `ok` is let go upstream.
    tokio::time::sleep(Duration::from_millis(30)).await;
    quiet(&mut rx);
    let (cmd, _r) = up.next().await;
    assert_eq!(cmd, ["UNSUBSCRIBE", "ok"]);
    let r = f
        .hub
        .unsubscribe(&a, Proto::Resp2, Kind::Channel, vec![], 2)
        .await;
    assert_eq!(r, Ok(Counts::default()));
    assert_eq!(
        reply(&mut rx, 2).await,
        "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
    );
}

#[tokio::test]
async fn a_new_connection_gets_every_subscription_again() {
    let f = hub(1 << 20).await;
    let mut up = Upstream::connect(&f, 1);
    let (a, mut rx) = Link::new(1, "a".into());
    for (kind, name, seq) in [
        (Kind::Channel, "c", 1),
        (Kind::Pattern, "p*", 2),
        (Kind::Shard, "s", 3),
    ] {
        let t = subscribe_bg(&f, &a, Proto::Resp2, kind, &[name], seq).await;
        let (cmd, _r) = up.next().await;
        up.push(
            &[
                &kind
                    .confirmation(true)
                    .iter()
                    .map(|&c| c as char)
                    .collect::<String>(),
                name,
            ],
            Some(1),
        );
        done(t).await.unwrap();
        let _ = reply(&mut rx, seq).await;
        assert_eq!(cmd[1], name);
    }
    assert_eq!(f.metrics.pubsub_channels.get(), 3);
    f.events.send(Event::Lost { conn: 0, epoch: 1 }).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(f.metrics.pubsub_channels.get(), 0);
    let mut up = Upstream::connect(&f, 2);
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(up.next().await.0);
    }
    sent.sort();
    assert_eq!(
        sent,
        [
            vec!["PSUBSCRIBE", "p*"],
            vec!["SSUBSCRIBE", "s"],
            vec!["SUBSCRIBE", "c"]
        ]
    );
    up.push(&["subscribe", "c"], Some(1));
    up.push(&["psubscribe", "p*"], Some(2));
    up.push(&["ssubscribe", "s"], Some(1));
    up.push(&["message", "c", "after"], None);
    up.push(&["pmessage", "p*", "px", "pat"], None);
    up.push(&["smessage", "s", "shard"], None);
    assert_eq!(
        message(&mut rx).await,
        "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nafter\r\n"
    );
    assert_eq!(
        message(&mut rx).await,
        "*4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npx\r\n$3\r\npat\r\n"
    );
    assert_eq!(
        message(&mut rx).await,
        "*3\r\n$8\r\nsmessage\r\n$1\r\ns\r\n$5\r\nshard\r\n"
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(f.metrics.pubsub_channels.get(), 3);
    // A stale event of the old connection changes nothing.
    f.events.send(Event::Lost { conn: 0, epoch: 1 }).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(f.metrics.pubsub_channels.get(), 3);
}

#[tokio::test]
async fn without_a_connection_a_subscribe_fails_fast_and_others_stay() {
    let f = hub(1 << 20).await;
    // The fixture's first attempt failed: a new SUBSCRIBE is told why at once.
    let (a, _rx) = Link::new(1, "a".into());
    let r = f
        .hub
        .subscribe(&a, Proto::Resp2, Kind::Channel, vec![b("x")], 1)
        .await;
    let e = r.unwrap_err();
    assert!(
        String::from_utf8_lossy(&e)
            .starts_with("-ERR upstream upstream:6380: connect failed: not yet"),
        "{e:?}"
    );
    // While connecting (after a lost connection), one waits for the connection.
    let mut up = Upstream::connect(&f, 1);
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Channel, &["x"], 2).await;
    let _ = up.next().await;
    f.events.send(Event::Lost { conn: 0, epoch: 1 }).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!t.is_finished());
    let mut up = Upstream::connect(&f, 2);
    let (cmd, _r) = up.next().await;
    assert_eq!(cmd, ["SUBSCRIBE", "x"]);
    up.push(&["subscribe", "x"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 1, shard: 0 }));
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_is_dropped_at_the_cap() {
    let f = hub(200).await;
    let mut up = Upstream::connect(&f, 1);
    let (slow, _slow_rx) = Link::new(1, "slow".into());
    let (fast, mut fast_rx) = Link::new(2, "fast".into());
    let t = subscribe_bg(&f, &slow, Proto::Resp2, Kind::Channel, &["c"], 1).await;
    let _ = up.next().await;
    up.push(&["subscribe", "c"], Some(1));
    done(t).await.unwrap();
    f.hub
        .subscribe(&fast, Proto::Resp2, Kind::Channel, vec![b("c")], 1)
        .await
        .unwrap();
    let _ = reply(&mut fast_rx, 1).await;
    // 64-byte messages: the fourth takes the slow one over 200 bytes.
    let payload = "x".repeat(33);
    for _ in 0..4 {
        up.push(&["message", "c", &payload], None);
        let m = message(&mut fast_rx).await;
        assert_eq!(m.len(), 64);
        // The fast one's session takes it off its count.
        fast.queued.fetch_sub(m.len(), Ordering::AcqRel);
    }
    tokio::time::timeout(T, slow.kill.cancelled())
        .await
        .expect("the slow subscriber is dropped");
    assert!(!fast.kill.is_cancelled());
    assert_eq!(slow.queued.load(Ordering::Acquire), 256);
    // Still subscribed upstream for the fast one.
    up.nothing().await;
    up.push(&["message", "c", "more"], None);
    assert!(message(&mut fast_rx).await.contains("more"));
}

mod cluster;
