//! PUBLISH, SPUBLISH and PUBSUB answer as one Redis would, although the hub
//! holds one upstream subscription per channel or pattern however many of
//! the proxy's clients share it (issue 17, finding 7; issue 19). Several
//! clients subscribe through the proxy (channels, overlapping patterns,
//! shard channels) and the same subscriptions are made straight on a twin
//! plain redis-server; the replies must be the same bytes (the lists of
//! `PUBSUB CHANNELS`/`SHARDCHANNELS` compared in sorted order: Redis gives
//! them in its hash table's order). The proxy authenticates as Azure's Data
//! Contributor policy; on a single endpoint and in front of the six-node
//! cluster.

mod common;

use common::proxy::{static_env, Proxy, Raw};
use common::redis::{PlainRedis, RedisServer};
use std::io::Write;
use std::time::{Duration, Instant};

const USER: &str = "contributor";

/// The questions asked on both sides, pipelined in one write.
const QUESTIONS: &[&[&str]] = &[
    &["PUBLISH", "ch1", "m"],
    &["PUBLISH", "ch2", "m"],
    &["PUBLISH", "ch3", "m"],
    &["PUBLISH", "xx", "m"],
    &["SPUBLISH", "s1", "m"],
    &["SPUBLISH", "s2", "m"],
    &["SPUBLISH", "s3", "m"],
    &["PUBSUB", "NUMSUB", "ch1", "ch2", "ch3", "xx"],
    &["PUBSUB", "NUMSUB"],
    &["PUBSUB", "NUMPAT"],
    &["PUBSUB", "CHANNELS"],
    &["PUBSUB", "CHANNELS", "ch*"],
    &["PUBSUB", "SHARDNUMSUB", "s1", "s2", "s3"],
    &["PUBSUB", "SHARDCHANNELS"],
    &["PUBSUB", "SHARDCHANNELS", "s*"],
];

/// One side (the proxy or the twin): its subscribers and a client that asks.
struct Side {
    port: u16,
    subs: Vec<Option<Raw>>,
    ask: Raw,
}

impl Side {
    fn new(port: u16) -> Side {
        Side {
            port,
            subs: Vec::new(),
            ask: Raw::connect(port),
        }
    }

    /// A new subscriber that sends each command and reads its
    /// confirmations (one per name).
    fn subscriber(&mut self, hello3: bool, cmds: &[&[&str]]) -> Vec<u8> {
        let mut c = Raw::connect(self.port);
        let mut seen = Vec::new();
        if hello3 {
            c.send(&["HELLO", "3"]);
            c.read();
        }
        for cmd in cmds {
            seen.extend(self.change(&mut c, cmd));
        }
        self.subs.push(Some(c));
        seen
    }

    fn change(&mut self, c: &mut Raw, cmd: &[&str]) -> Vec<u8> {
        c.send(cmd);
        let mut seen = Vec::new();
        for _ in 0..(cmd.len() - 1).max(1) {
            seen.extend(c.read());
        }
        seen
    }

    /// Subscriber `i` sends `cmd` (an unsubscribe) and reads its confirmations.
    fn unsubscribe(&mut self, i: usize, cmd: &[&str]) -> Vec<u8> {
        let mut c = self.subs[i].take().expect("connected");
        let seen = self.change(&mut c, cmd);
        self.subs[i] = Some(c);
        seen
    }

    /// Subscriber `i` disconnects.
    fn leave(&mut self, i: usize) {
        self.subs[i] = None;
    }

    /// The answers to [`QUESTIONS`], pipelined, as text (lists sorted).
    fn answers(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        for q in QUESTIONS {
            let refs: Vec<&[u8]> = q.iter().map(|a| a.as_bytes()).collect();
            all.extend_from_slice(&redis_entra_proxy::resp::command(&refs));
        }
        self.ask.s.write_all(&all).unwrap();
        QUESTIONS
            .iter()
            .map(|q| {
                let r = String::from_utf8_lossy(&self.ask.read()).into_owned();
                let r = if q.get(1).is_some_and(|s| s.ends_with("CHANNELS")) {
                    sorted(&r)
                } else {
                    r
                };
                format!("{} => {r:?}", q.join(" "))
            })
            .collect()
    }
}

/// An array of bulk strings with its elements sorted.
fn sorted(reply: &str) -> String {
    let mut lines = reply.split("\r\n");
    let head = lines.next().unwrap_or_default().to_string();
    let rest: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    let mut items: Vec<String> = rest
        .chunks(2)
        .map(|c| format!("{}\r\n{}\r\n", c[0], c.get(1).unwrap_or(&"")))
        .collect();
    items.sort();
    format!("{head}\r\n{}", items.concat())
}

/// Both sides' answers, once they agree (a disconnect reaches the proxy's
/// hub and the twin a moment after the socket closes), else the last ones:
/// (twin, proxy). Bounded: 100 rounds.
fn settled(twin: &mut Side, proxy: &mut Side) -> (Vec<String>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let want = twin.answers();
        let got = proxy.answers();
        if want == got || Instant::now() > deadline {
            return (want, got);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_same(twin: &mut Side, proxy: &mut Side, when: &str) {
    let (want, got) = settled(twin, proxy);
    let diff: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("  twin:  {w}\n  proxy: {g}"))
        .collect();
    assert!(
        diff.is_empty(),
        "{when}: differs from Redis:\n{}",
        diff.join("\n")
    );
}

/// A transaction of counting commands (with one the proxy answers itself),
/// pipelined in one write (sent whole on the shared connection) and one
/// command at a time (on a dedicated connection): EXEC's array as Redis's.
fn transaction(twin: &mut Side, proxy: &mut Side) {
    let tx: &[&[&str]] = &[
        &["MULTI"],
        &["PUBLISH", "ch1", "m"],
        &["PUBSUB", "NUMSUB", "ch1", "ch2"],
        &["SPUBLISH", "s1", "m"],
        &["PUBSUB", "NUMPAT"],
        &["PUBSUB", "SHARDNUMSUB", "s1"],
        &["EXEC"],
    ];
    let with_local: Vec<&[&str]> = tx[..2]
        .iter()
        .copied()
        .chain([&["CLIENT", "GETNAME"][..]])
        .chain(tx[2..].iter().copied())
        .collect();
    for (how, cmds) in [("pipelined", tx), ("with a local command", &with_local[..])] {
        let mut replies = Vec::new();
        for side in [&mut *twin, &mut *proxy] {
            let mut all = Vec::new();
            for c in cmds {
                let refs: Vec<&[u8]> = c.iter().map(|a| a.as_bytes()).collect();
                all.extend_from_slice(&redis_entra_proxy::resp::command(&refs));
            }
            side.ask.s.write_all(&all).unwrap();
            let r: Vec<u8> = cmds.iter().flat_map(|_| side.ask.read()).collect();
            replies.push(String::from_utf8_lossy(&r).into_owned());
        }
        assert_eq!(replies[1], replies[0], "MULTI, {how}");
    }
    let mut replies = Vec::new();
    for side in [&mut *twin, &mut *proxy] {
        let r: String = tx.iter().map(|c| side.ask.call(c)).collect();
        replies.push(r);
    }
    assert_eq!(replies[1], replies[0], "MULTI, one command at a time");
}

/// The whole scenario on one proxy (single endpoint or cluster; inside
/// MULTI on a cluster the counts are the node's, as the README says).
fn scenario(proxy_port: u16, cluster: bool) {
    let twin_server = PlainRedis::start();
    let mut twin = Side::new(twin_server.port);
    let mut proxy = Side::new(proxy_port);
    let subscribers: &[(bool, &[&[&str]])] = &[
        (false, &[&["SUBSCRIBE", "ch1", "ch2"]]),
        (false, &[&["SUBSCRIBE", "ch1"]]),
        (false, &[&["PSUBSCRIBE", "ch*", "c?1"]]),
        (false, &[&["PSUBSCRIBE", "ch*"], &["SUBSCRIBE", "ch2"]]),
        (false, &[&["SSUBSCRIBE", "s1"], &["SSUBSCRIBE", "s2"]]),
        (false, &[&["SSUBSCRIBE", "s1"]]),
        (true, &[&["SUBSCRIBE", "ch3"], &["PSUBSCRIBE", "c?1"]]),
        // On a cluster also held on every primary (it matches keyspace
        // notifications): still one pattern, one receiver.
        (false, &[&["PSUBSCRIBE", "*"]]),
    ];
    for (hello3, cmds) in subscribers {
        let want = twin.subscriber(*hello3, cmds);
        let got = proxy.subscriber(*hello3, cmds);
        assert_eq!(got, want, "confirmations of {cmds:?}");
    }
    assert_same(&mut twin, &mut proxy, "all subscribed");

    // A RESP3 subscriber publishing to its own channel: its message, then
    // the count (the messages of the questions above read first).
    for side in [&mut twin, &mut proxy] {
        let c = side.subs[6].as_mut().unwrap();
        for _ in 0..1000 {
            if c.try_read(Duration::from_millis(300)).is_none() {
                break;
            }
        }
        c.send(&["PUBLISH", "ch3", "own"]);
    }
    let want = [
        twin.subs[6].as_mut().unwrap().read(),
        twin.subs[6].as_mut().unwrap().read(),
    ];
    let got = [
        proxy.subs[6].as_mut().unwrap().read(),
        proxy.subs[6].as_mut().unwrap().read(),
    ];
    assert_eq!(
        String::from_utf8_lossy(&got.concat()),
        String::from_utf8_lossy(&want.concat()),
        "a RESP3 subscriber's PUBLISH to its own channel"
    );

    // CLIENT REPLY OFF silences the count; ON brings the next one back.
    let lines: &[&[&str]] = &[
        &["CLIENT", "REPLY", "OFF"],
        &["PUBLISH", "ch1", "silent"],
        &["PUBSUB", "NUMSUB", "ch1"],
        &["CLIENT", "REPLY", "ON"],
        &["PUBLISH", "ch1", "loud"],
        &["PUBSUB", "NUMSUB", "ch1"],
    ];
    let mut replies = Vec::new();
    for side in [&mut twin, &mut proxy] {
        for l in lines {
            side.ask.send(l);
        }
        let r: Vec<u8> = (0..3).flat_map(|_| side.ask.read()).collect();
        replies.push(String::from_utf8_lossy(&r).into_owned());
    }
    assert_eq!(replies[1], replies[0], "around CLIENT REPLY OFF/ON");
    if !cluster {
        transaction(&mut twin, &mut proxy);
    }

    // Some leave: by unsubscribing, and by disconnecting.
    for (i, cmd) in [(1, &["UNSUBSCRIBE", "ch1"][..]), (3, &["PUNSUBSCRIBE"][..])] {
        let want = twin.unsubscribe(i, cmd);
        let got = proxy.unsubscribe(i, cmd);
        assert_eq!(got, want, "confirmations of {cmd:?}");
    }
    assert_same(&mut twin, &mut proxy, "after two unsubscribed");
    for i in [0, 5] {
        twin.leave(i);
        proxy.leave(i);
    }
    assert_same(&mut twin, &mut proxy, "after two disconnected");
    for i in [2, 3, 4, 6, 7] {
        twin.leave(i);
        proxy.leave(i);
    }
    assert_same(&mut twin, &mut proxy, "after all left");
}

#[test]
fn single_endpoint_counts_as_one_redis() {
    let redis = RedisServer::start("proxyuser", "unused-token");
    let proxy = Proxy::start(&static_env(&redis, USER, common::policies::PASSWORD));
    scenario(proxy.port, false);
}

#[test]
fn cluster_counts_as_one_redis() {
    let c = common::cluster::shared(common::cluster::Announce::Ip);
    let proxy = common::cluster::proxy_with(
        c,
        &[
            ("REDIS_ENTRA_PROXY_AUTH__USERNAME", USER),
            (
                "REDIS_ENTRA_PROXY_AUTH__STATIC__PASSWORD",
                common::policies::PASSWORD,
            ),
        ],
    );
    scenario(proxy.port, true);
}
