//! The hub in front of a cluster: where subscriptions are held once the slot
//! map is known, which connection's messages are delivered, and how a
//! subscription follows its slot.

use super::*;
use tokio::sync::Notify;

fn node(port: u16) -> Node {
    Node {
        host: "10.0.0.1".into(),
        port,
    }
}

/// A slot map: the first node owns slots up to `split`, the second the rest.
fn two_shards(split: u16, a: u16, b: u16) -> Arc<SlotMap> {
    Arc::new(SlotMap::from_ranges(&[(0, split, node(a)), (split + 1, 16383, node(b))]).unwrap())
}

/// The next connection the hub asks for: its index and node.
async fn started(f: &mut Fixture) -> (usize, Node) {
    let s = tokio::time::timeout(T, f.starts.recv())
        .await
        .expect("a connection asked for")
        .unwrap();
    (s.conn, s.node.expect("a primary"))
}

#[tokio::test]
async fn cluster_keyspace_patterns_are_held_on_every_primary_and_each_message_comes_once() {
    let mut f = hub(1 << 20).await;
    let mut home = Upstream::connect(&f, 1);
    let refresh = Arc::new(Notify::new());
    f.hub
        .topology(two_shards(8191, 8501, 8502), refresh.clone());
    let (a, mut rx) = Link::new(1, "a".into());

    // A plain channel: home only, nothing else dialled.
    let t = subscribe_bg(&f, &a, Proto::Resp3, Kind::Channel, &["news"], 1).await;
    assert_eq!(home.next().await.0, ["SUBSCRIBE", "news"]);
    home.push(&["subscribe", "news"], Some(1));
    done(t).await.unwrap();
    let _ = reply(&mut rx, 1).await;
    assert!(
        f.starts.try_recv().is_err(),
        "no primary dialled for a channel"
    );

    // `*` matches published messages and notifications: home and both primaries.
    let t = subscribe_bg(&f, &a, Proto::Resp3, Kind::Pattern, &["*"], 2).await;
    assert_eq!(home.next().await.0, ["PSUBSCRIBE", "*"]);
    let (c1, n1) = started(&mut f).await;
    let (c2, n2) = started(&mut f).await;
    assert_eq!((n1.port, n2.port), (8501, 8502));
    let mut p1 = Upstream::connect_to(&f.events, c1, 1);
    let mut p2 = Upstream::connect_to(&f.events, c2, 1);
    assert_eq!(p1.next().await.0, ["PSUBSCRIBE", "*"]);
    assert_eq!(p2.next().await.0, ["PSUBSCRIBE", "*"]);
    home.push(&["psubscribe", "*"], Some(2));
    p1.push(&["psubscribe", "*"], Some(1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!t.is_finished(), "confirmed before every primary confirmed");
    p2.push(&["psubscribe", "*"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 2, shard: 0 }));
    let _ = reply(&mut rx, 2).await;
    assert_eq!(f.metrics.pubsub_channels.get(), 4);

    // A published message reaches every node: only home's copy is delivered.
    for up in [&home, &p1, &p2] {
        up.push(&["pmessage", "*", "news", "hi"], None);
    }
    // A notification comes from the shard of its key only: delivered from it,
    // and home's copy (home is a node too) dropped.
    p2.push(&["pmessage", "*", "__keyspace@0__:k", "set"], None);
    home.push(&["pmessage", "*", "__keyspace@0__:k", "set"], None);
    assert!(message(&mut rx).await.contains("news"));
    assert!(message(&mut rx).await.contains("__keyspace@0__:k"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    quiet(&mut rx);

    // A primary that reconnects gets its subscriptions again.
    p1.lose();
    let mut p1 = Upstream::connect_to(&f.events, c1, 2);
    assert_eq!(p1.next().await.0, ["PSUBSCRIBE", "*"]);
    // Connections were lost: the cluster layer is asked to look again.
    tokio::time::timeout(T, refresh.notified()).await.unwrap();
}

#[tokio::test]
async fn a_shard_channel_follows_its_slot_when_it_moves() {
    let mut f = hub(1 << 20).await;
    let mut home = Upstream::connect(&f, 1);
    let slot = crate::command::keys::slot(b"feed");
    let refresh = Arc::new(Notify::new());
    // The first node owns the channel's slot.
    f.hub
        .topology(two_shards(slot, 8501, 8502), refresh.clone());
    let (a, mut rx) = Link::new(1, "a".into());
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Shard, &["feed"], 1).await;
    let (c1, n1) = started(&mut f).await;
    assert_eq!(n1.port, 8501);
    let mut p1 = Upstream::connect_to(&f.events, c1, 1);
    assert_eq!(p1.next().await.0, ["SSUBSCRIBE", "feed"]);
    p1.push(&["ssubscribe", "feed"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 0, shard: 1 }));
    let _ = reply(&mut rx, 1).await;
    home.nothing().await;

    // The slot moves: the server drops the subscription; the hub's map is
    // not refreshed yet, so it asks the old owner, which answers MOVED.
    p1.push(&["sunsubscribe", "feed"], Some(0));
    tokio::time::timeout(T, refresh.notified()).await.unwrap();
    let (cmd, req) = p1.next().await;
    assert_eq!(cmd, ["SSUBSCRIBE", "feed"]);
    let moved = format!("-MOVED {slot} 10.0.0.1:8502\r\n");
    let _ = req.reply.unwrap().send(Ok(Bytes::from(moved)));
    let (c2, n2) = started(&mut f).await;
    assert_eq!(n2.port, 8502);
    let mut p2 = Upstream::connect_to(&f.events, c2, 1);
    assert_eq!(p2.next().await.0, ["SSUBSCRIBE", "feed"]);
    p2.push(&["ssubscribe", "feed"], Some(1));
    p2.push(&["smessage", "feed", "after the move"], None);
    assert!(message(&mut rx).await.contains("after the move"));
    // The client saw nothing of the move.
    quiet(&mut rx);

    // The refreshed map has only the second node: the first one's connection
    // is closed.
    let only = Arc::new(SlotMap::from_ranges(&[(0, 16383, node(8502))]).unwrap());
    f.hub.topology(only, refresh.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    p1.nothing().await;
    p2.nothing().await;
    assert_eq!(f.metrics.pubsub_channels.get(), 1);
}

#[tokio::test]
async fn subscriptions_made_before_the_cluster_was_known_are_placed_again() {
    let mut f = hub(1 << 20).await;
    let mut home = Upstream::connect(&f, 1);
    let (a, mut rx) = Link::new(1, "a".into());
    let t = subscribe_bg(
        &f,
        &a,
        Proto::Resp2,
        Kind::Channel,
        &["__keyevent@0__:del"],
        1,
    )
    .await;
    assert_eq!(home.next().await.0, ["SUBSCRIBE", "__keyevent@0__:del"]);
    home.push(&["subscribe", "__keyevent@0__:del"], Some(1));
    done(t).await.unwrap();
    let _ = reply(&mut rx, 1).await;
    // The cluster is found: notifications move to the primaries.
    f.hub
        .topology(two_shards(8191, 8501, 8502), Arc::new(Notify::new()));
    let (c1, _) = started(&mut f).await;
    let (c2, _) = started(&mut f).await;
    let mut p1 = Upstream::connect_to(&f.events, c1, 1);
    let mut p2 = Upstream::connect_to(&f.events, c2, 1);
    assert_eq!(p1.next().await.0, ["SUBSCRIBE", "__keyevent@0__:del"]);
    assert_eq!(p2.next().await.0, ["SUBSCRIBE", "__keyevent@0__:del"]);
    assert_eq!(home.next().await.0, ["UNSUBSCRIBE", "__keyevent@0__:del"]);
    p1.push(&["subscribe", "__keyevent@0__:del"], Some(1));
    p2.push(&["subscribe", "__keyevent@0__:del"], Some(1));
    home.push(&["unsubscribe", "__keyevent@0__:del"], Some(0));
    p1.push(&["message", "__keyevent@0__:del", "k1"], None);
    p2.push(&["message", "__keyevent@0__:del", "k2"], None);
    assert!(message(&mut rx).await.contains("k1"));
    assert!(message(&mut rx).await.contains("k2"));
    // The client was told nothing: it is subscribed as before.
    quiet(&mut rx);
}

#[tokio::test]
async fn a_moved_before_the_cluster_is_known_waits_for_the_slot_map() {
    let mut f = hub(1 << 20).await;
    let mut home = Upstream::connect(&f, 1);
    let (a, mut rx) = Link::new(1, "a".into());
    // Subscribed before the cluster layer handed over its first map: the
    // configured host is asked, and it does not own the slot.
    let t = subscribe_bg(&f, &a, Proto::Resp2, Kind::Shard, &["feed"], 1).await;
    let (cmd, req) = home.next().await;
    assert_eq!(cmd, ["SSUBSCRIBE", "feed"]);
    let slot = crate::command::keys::slot(b"feed");
    let moved = format!("-MOVED {slot} 10.0.0.1:8502\r\n");
    let _ = req.reply.unwrap().send(Ok(Bytes::from(moved)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !t.is_finished(),
        "the client got the MOVED: {:?}",
        done(t).await
    );
    // The map comes: the subscription is made on the slot's owner.
    f.hub
        .topology(two_shards(slot - 1, 8501, 8502), Arc::new(Notify::new()));
    let (c2, n2) = started(&mut f).await;
    assert_eq!(n2.port, 8502);
    let mut p2 = Upstream::connect_to(&f.events, c2, 1);
    assert_eq!(p2.next().await.0, ["SSUBSCRIBE", "feed"]);
    p2.push(&["ssubscribe", "feed"], Some(1));
    assert_eq!(done(t).await, Ok(Counts { subs: 0, shard: 1 }));
    assert_eq!(
        reply(&mut rx, 1).await,
        "*3\r\n$10\r\nssubscribe\r\n$4\r\nfeed\r\n:1\r\n"
    );
}
