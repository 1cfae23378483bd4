//! The counts one Redis would give for what the hub changes: the server sees
//! the hub as one subscriber per channel or pattern (per connection), however
//! many local clients share it. So `PUBLISH`/`SPUBLISH` receivers and `PUBSUB
//! NUMSUB`/`SHARDNUMSUB`/`NUMPAT` are the server's count less the hub's own
//! subscriptions plus the local clients', and on a cluster the nodes' answers
//! are put together (summed, or for `CHANNELS` united) as one server's.
//!
//! [`Question`] says which command needs this; [`answer`] is pure, over the
//! nodes' replies and the registry's figures ([`Held`]); the session (single
//! endpoint) and the cluster dispatcher ask through [`Hub::census`].

use super::{Hub, Kind, Op, Receivers};
use crate::resp;
use crate::resp::scan::ReplyScanner;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use tokio::sync::oneshot;

/// A command whose reply counts subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// PUBLISH (`Kind::Channel`) or SPUBLISH (`Kind::Shard`) to `channel`.
    Publish { kind: Kind, channel: Bytes },
    /// PUBSUB NUMSUB (`Kind::Channel`) or SHARDNUMSUB (`Kind::Shard`).
    NumSub { kind: Kind },
    /// PUBSUB NUMPAT: patterns subscribed, each once (Redis 7).
    NumPat,
    /// PUBSUB CHANNELS or SHARDCHANNELS, with or without a pattern.
    Channels,
}

impl Question {
    /// The question `args` (a whole command) asks, if any (with the arity
    /// Redis accepts; anything else goes to the server as it is).
    pub fn parse(args: &[&[u8]]) -> Option<Question> {
        let name = args.first()?;
        let is = |a: &[u8], w: &str| a.eq_ignore_ascii_case(w.as_bytes());
        if args.len() == 3 && (is(name, "PUBLISH") || is(name, "SPUBLISH")) {
            let kind = if is(name, "PUBLISH") {
                Kind::Channel
            } else {
                Kind::Shard
            };
            let channel = Bytes::copy_from_slice(args[1]);
            return Some(Question::Publish { kind, channel });
        }
        if !is(name, "PUBSUB") || args.len() < 2 {
            return None;
        }
        let sub = args[1];
        let n = args.len();
        if is(sub, "NUMSUB") {
            Some(Question::NumSub {
                kind: Kind::Channel,
            })
        } else if is(sub, "SHARDNUMSUB") {
            Some(Question::NumSub { kind: Kind::Shard })
        } else if is(sub, "NUMPAT") && n == 2 {
            Some(Question::NumPat)
        } else if (is(sub, "CHANNELS") || is(sub, "SHARDCHANNELS")) && n <= 3 {
            Some(Question::Channels)
        } else {
            None
        }
    }

    /// On a cluster: asked of every primary (else of one node: any for
    /// PUBLISH, the channel's owner for SPUBLISH).
    pub fn every_node(&self) -> bool {
        !matches!(self, Question::Publish { .. })
    }
}

/// What the registry knows, for [`answer`].
pub(super) trait Held {
    /// Local receivers of a message to `channel` (one per client subscribed
    /// to it, and for a channel one per client and matching pattern), and
    /// the hub's confirmed subscriptions on `node` (`None`: the home
    /// connection) that the server counted for it.
    fn receivers(&self, kind: Kind, channel: &[u8], node: Option<&str>) -> Receivers;
    /// Local subscribers of `name`, and the hub's confirmed subscriptions to
    /// it on all its connections.
    fn subscribers(&self, kind: Kind, name: &[u8]) -> Receivers;
    /// Patterns with a local subscriber, and the hub's confirmed pattern
    /// subscriptions on all its connections.
    fn patterns(&self) -> Receivers;
}

/// No registry: the servers' figures, put together.
pub(super) struct Nothing;

impl Held for Nothing {
    fn receivers(&self, _: Kind, _: &[u8], _: Option<&str>) -> Receivers {
        Receivers::default()
    }
    fn subscribers(&self, _: Kind, _: &[u8]) -> Receivers {
        Receivers::default()
    }
    fn patterns(&self) -> Receivers {
        Receivers::default()
    }
}

fn integer(r: &[u8]) -> Option<i64> {
    let body = r.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// The server's count, less the hub's, plus the local clients'.
fn adjust(server: i64, r: Receivers) -> i64 {
    (server - r.upstream as i64).max(0) + r.local as i64
}

/// The elements of an array (or set) reply.
fn elements(reply: &[u8]) -> Option<Vec<&[u8]>> {
    let first = *reply.first()?;
    if first != b'*' && first != b'~' {
        return None;
    }
    let end = memchr::memchr(b'\r', reply)?;
    let n: usize = std::str::from_utf8(&reply[1..end]).ok()?.parse().ok()?;
    let mut pos = end + 2;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let r = ReplyScanner::new().scan(reply.get(pos..)?).ok()??;
        out.push(&reply[pos..pos + r.len]);
        pos += r.len;
    }
    Some(out)
}

/// The value of a bulk (or simple) string reply.
fn string(r: &[u8]) -> Option<&[u8]> {
    match r.first()? {
        b'+' => r.get(1..r.len().checked_sub(2)?),
        b'$' => {
            let end = memchr::memchr(b'\r', r)?;
            r.get(end + 2..r.len().checked_sub(2)?)
        }
        _ => None,
    }
}

fn array(items: &[&[u8]], set: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + items.iter().map(|i| i.len()).sum::<usize>());
    b.put_slice(format!("{}{}\r\n", if set { '~' } else { '*' }, items.len()).as_bytes());
    for i in items {
        b.put_slice(i);
    }
    b.freeze()
}

fn unreadable() -> Bytes {
    resp::error("ERR redis-entra-proxy: cannot read the server's pub/sub count")
}

/// The reply one Redis would give to `q`, from the replies of the nodes
/// asked (`None`: the single endpoint, through the home connection's
/// server). The first error among them is the answer.
pub(super) fn answer(held: &impl Held, q: &Question, replies: &[(Option<&str>, &[u8])]) -> Bytes {
    if let Some((_, e)) = replies
        .iter()
        .find(|(_, r)| matches!(r.first(), Some(b'-' | b'!')))
    {
        return Bytes::copy_from_slice(e);
    }
    let Some((node, first)) = replies.first() else {
        return unreadable();
    };
    match q {
        Question::Publish { kind, channel } => match integer(first) {
            Some(n) => resp::integer(adjust(n, held.receivers(*kind, channel, *node))),
            None => Bytes::copy_from_slice(first),
        },
        Question::NumPat => {
            let mut n = 0i64;
            for (_, r) in replies {
                match integer(r) {
                    Some(i) => n += i,
                    None => return unreadable(),
                }
            }
            resp::integer(adjust(n, held.patterns()))
        }
        Question::NumSub { kind } => {
            // name, count, name, count... in the order asked, from every node.
            let mut names: Vec<&[u8]> = Vec::new();
            let mut sums: Vec<i64> = Vec::new();
            for (i, (_, r)) in replies.iter().enumerate() {
                let Some(els) = elements(r) else {
                    return unreadable();
                };
                if i == 0 {
                    names = els.iter().step_by(2).copied().collect();
                    sums = vec![0; names.len()];
                }
                if els.len() != names.len() * 2 {
                    return unreadable();
                }
                for (j, pair) in els.chunks(2).enumerate() {
                    match integer(pair[1]) {
                        Some(n) => sums[j] += n,
                        None => return unreadable(),
                    }
                }
            }
            let mut out: Vec<Bytes> = Vec::with_capacity(names.len() * 2);
            for (name, sum) in names.iter().zip(&sums) {
                let Some(channel) = string(name) else {
                    return unreadable();
                };
                out.push(Bytes::copy_from_slice(name));
                out.push(resp::integer(adjust(
                    *sum,
                    held.subscribers(*kind, channel),
                )));
            }
            let refs: Vec<&[u8]> = out.iter().map(|b| &b[..]).collect();
            array(&refs, first.first() == Some(&b'~'))
        }
        Question::Channels => {
            let mut all: Vec<&[u8]> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for (_, r) in replies {
                let Some(els) = elements(r) else {
                    return unreadable();
                };
                all.extend(els.into_iter().filter(|e| seen.insert(*e)));
            }
            array(&all, first.first() == Some(&b'~'))
        }
    }
}

/// A reply of a batch to be made one Redis's: the reply at `at`, or the
/// element `element` of it (EXEC's array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub at: usize,
    pub element: Option<usize>,
    pub question: Question,
}

/// A question and the replies of the nodes it was asked of.
pub(super) type Ask = (Question, Vec<(Option<String>, Bytes)>);

/// [`answer`] for each of `asks`.
pub(super) fn answer_all(held: &impl Held, asks: &[Ask]) -> Vec<Bytes> {
    asks.iter()
        .map(|(q, replies)| {
            let refs: Vec<(Option<&str>, &[u8])> = replies
                .iter()
                .map(|(n, r)| (n.as_deref(), &r[..]))
                .collect();
            answer(held, q, &refs)
        })
        .collect()
}

/// Each reply of a batch of `count` commands (`None`: cannot be split).
fn split(bytes: &Bytes, count: usize) -> Option<Vec<Bytes>> {
    let mut out = Vec::with_capacity(count);
    let mut pos = 0;
    for _ in 0..count {
        let r = ReplyScanner::new().scan(bytes.get(pos..)?).ok()??;
        out.push(bytes.slice(pos..pos + r.len));
        pos += r.len;
    }
    (pos == bytes.len()).then_some(out)
}

impl Hub {
    /// The reply one Redis would give to `q`, from the nodes' `replies`
    /// (`None`: the single endpoint).
    pub async fn census(&self, q: Question, replies: Vec<(Option<String>, Bytes)>) -> Bytes {
        let mut out = self.census_many(vec![(q, replies)]).await;
        out.pop().unwrap_or_else(unreadable)
    }

    /// [`Hub::census`] for several questions, in one turn of the hub's task.
    /// Without the hub (shut down), the servers' figures put together.
    async fn census_many(&self, asks: Vec<Ask>) -> Vec<Bytes> {
        let (tx, rx) = oneshot::channel();
        let op = Op::Census {
            asks: asks.clone(),
            reply: tx,
        };
        if self.ops.send(op).is_ok() {
            if let Ok(b) = rx.await {
                return b;
            }
        }
        answer_all(&Nothing, &asks)
    }

    /// The replies of a batch of `count` commands sent to the single
    /// endpoint, those `fixes` name made what one Redis would answer
    /// ([`Hub::census`]). An EXEC that did not run (nil) stays as it is.
    pub async fn census_batch(&self, bytes: Bytes, count: usize, fixes: Vec<Fix>) -> Bytes {
        let Some(mut replies) = split(&bytes, count) else {
            return bytes;
        };
        // The elements of the EXEC arrays that hold fixes.
        let mut arrays: HashMap<usize, Vec<Bytes>> = HashMap::new();
        let mut asks = Vec::with_capacity(fixes.len());
        let mut places = Vec::with_capacity(fixes.len());
        for f in fixes {
            let Some(r) = replies.get(f.at) else {
                continue;
            };
            let piece = match f.element {
                None => r.clone(),
                Some(i) => {
                    if let std::collections::hash_map::Entry::Vacant(v) = arrays.entry(f.at) {
                        let Some(els) = elements(r) else {
                            continue;
                        };
                        v.insert(els.into_iter().map(Bytes::copy_from_slice).collect());
                    }
                    match arrays.get(&f.at).and_then(|els| els.get(i)) {
                        Some(e) => e.clone(),
                        None => continue,
                    }
                }
            };
            asks.push((f.question, vec![(None, piece)]));
            places.push((f.at, f.element));
        }
        let answers = self.census_many(asks).await;
        for ((at, element), a) in places.into_iter().zip(answers) {
            let slot = match element {
                None => replies.get_mut(at),
                Some(i) => arrays.get_mut(&at).and_then(|els| els.get_mut(i)),
            };
            if let Some(s) = slot {
                *s = a;
            }
        }
        for (at, els) in arrays {
            let refs: Vec<&[u8]> = els.iter().map(|b| &b[..]).collect();
            replies[at] = array(&refs, false);
        }
        let mut out = BytesMut::with_capacity(bytes.len() + 16);
        for r in replies {
            out.put_slice(&r);
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Local clients and the hub's own subscriptions, fixed.
    struct Fixed;

    impl Held for Fixed {
        fn receivers(&self, kind: Kind, channel: &[u8], node: Option<&str>) -> Receivers {
            match (kind, channel, node) {
                (Kind::Channel, b"ch", Some("a:1")) => Receivers {
                    local: 5,
                    upstream: 2,
                },
                (Kind::Shard, b"s", None) => Receivers {
                    local: 3,
                    upstream: 1,
                },
                _ => Receivers::default(),
            }
        }
        fn subscribers(&self, kind: Kind, name: &[u8]) -> Receivers {
            match (kind, name) {
                (Kind::Channel, b"ch") => Receivers {
                    local: 4,
                    upstream: 1,
                },
                _ => Receivers::default(),
            }
        }
        fn patterns(&self) -> Receivers {
            Receivers {
                local: 2,
                upstream: 3,
            }
        }
    }

    fn q(line: &str) -> Option<Question> {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        Question::parse(&args)
    }

    fn ask(line: &str, replies: &[(Option<&str>, &str)]) -> String {
        let refs: Vec<(Option<&str>, &[u8])> =
            replies.iter().map(|(n, r)| (*n, r.as_bytes())).collect();
        let b = answer(&Fixed, &q(line).expect("a question"), &refs);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn questions_are_the_counting_commands_with_their_arity() {
        assert_eq!(
            q("publish ch m"),
            Some(Question::Publish {
                kind: Kind::Channel,
                channel: Bytes::from_static(b"ch")
            })
        );
        assert!(matches!(
            q("SPUBLISH s m"),
            Some(Question::Publish {
                kind: Kind::Shard,
                ..
            })
        ));
        assert_eq!(q("PUBLISH ch"), None);
        assert_eq!(
            q("PUBSUB numsub a b"),
            Some(Question::NumSub {
                kind: Kind::Channel
            })
        );
        assert_eq!(q("PUBSUB NUMSUB"), q("PUBSUB NUMSUB a"));
        assert_eq!(
            q("PUBSUB SHARDNUMSUB"),
            Some(Question::NumSub { kind: Kind::Shard })
        );
        assert_eq!(q("PUBSUB NUMPAT"), Some(Question::NumPat));
        assert_eq!(q("PUBSUB NUMPAT x"), None);
        assert_eq!(q("PUBSUB CHANNELS a*"), Some(Question::Channels));
        assert_eq!(q("PUBSUB SHARDCHANNELS"), Some(Question::Channels));
        assert_eq!(q("PUBSUB CHANNELS a b"), None);
        assert_eq!(q("PUBSUB HELP"), None);
        assert_eq!(q("PUBSUB"), None);
        assert_eq!(q("GET ch"), None);
        assert!(!q("PUBLISH c m").unwrap().every_node());
        assert!(q("PUBSUB NUMPAT").unwrap().every_node());
    }

    #[test]
    fn publish_counts_the_local_receivers_instead_of_the_hub() {
        assert_eq!(ask("PUBLISH ch m", &[(Some("a:1"), ":3\r\n")]), ":6\r\n");
        assert_eq!(ask("SPUBLISH s m", &[(None, ":1\r\n")]), ":3\r\n");
        assert_eq!(ask("PUBLISH zz m", &[(None, ":2\r\n")]), ":2\r\n");
        // Never below the local count, whatever the server said.
        assert_eq!(ask("PUBLISH ch m", &[(Some("a:1"), ":0\r\n")]), ":5\r\n");
        assert_eq!(
            ask("PUBLISH ch m", &[(None, "-NOPERM no\r\n")]),
            "-NOPERM no\r\n"
        );
    }

    #[test]
    fn numsub_and_numpat_sum_the_nodes_less_the_hub_plus_local() {
        let a = "*4\r\n$2\r\nch\r\n:1\r\n$2\r\nzz\r\n:2\r\n";
        let b = "*4\r\n$2\r\nch\r\n:1\r\n$2\r\nzz\r\n:0\r\n";
        assert_eq!(
            ask("PUBSUB NUMSUB ch zz", &[(None, a), (None, b)]),
            "*4\r\n$2\r\nch\r\n:5\r\n$2\r\nzz\r\n:2\r\n"
        );
        assert_eq!(ask("PUBSUB NUMSUB", &[(None, "*0\r\n")]), "*0\r\n");
        assert_eq!(
            ask("PUBSUB NUMPAT", &[(None, ":2\r\n"), (None, ":1\r\n")]),
            ":2\r\n"
        );
        assert!(ask("PUBSUB NUMPAT", &[(None, "+x\r\n")]).starts_with("-ERR"));
        assert!(ask("PUBSUB NUMSUB ch", &[(None, a), (None, "*0\r\n")]).starts_with("-ERR"));
    }

    #[test]
    fn channels_are_united() {
        let a = "*2\r\n$1\r\nx\r\n$1\r\ny\r\n";
        let b = "*2\r\n$1\r\ny\r\n$1\r\nz\r\n";
        assert_eq!(
            ask("PUBSUB CHANNELS", &[(None, a), (None, b), (None, "*0\r\n")]),
            "*3\r\n$1\r\nx\r\n$1\r\ny\r\n$1\r\nz\r\n"
        );
    }

    /// Without the hub (gone), the servers' figures stay, each in its place.
    #[tokio::test]
    async fn fixes_land_on_their_reply_or_element() {
        let (ops, _) = tokio::sync::mpsc::unbounded_channel();
        let hub = Hub {
            ops,
            upstream: Default::default(),
        };
        let batch =
            Bytes::from_static(b"+OK\r\n:4\r\n*3\r\n:2\r\n$1\r\nx\r\n*2\r\n$1\r\nc\r\n:1\r\n");
        let publish = Question::Publish {
            kind: Kind::Channel,
            channel: Bytes::from_static(b"c"),
        };
        let numsub = Question::NumSub {
            kind: Kind::Channel,
        };
        let fixes = vec![
            Fix {
                at: 1,
                element: None,
                question: publish.clone(),
            },
            Fix {
                at: 2,
                element: Some(0),
                question: publish.clone(),
            },
            Fix {
                at: 2,
                element: Some(2),
                question: numsub,
            },
        ];
        let out = hub.census_batch(batch.clone(), 3, fixes).await;
        assert_eq!(out, batch);
        // A nil EXEC (the transaction did not run) stays nil.
        let nil = Bytes::from_static(b"*-1\r\n");
        let fix = Fix {
            at: 0,
            element: Some(0),
            question: publish,
        };
        assert_eq!(hub.census_batch(nil.clone(), 1, vec![fix]).await, nil);
    }

    #[test]
    fn a_batch_is_split_and_put_back() {
        let b = Bytes::from_static(b"+OK\r\n:1\r\n$1\r\nx\r\n");
        assert_eq!(split(&b, 3).unwrap()[1], Bytes::from_static(b":1\r\n"));
        assert!(split(&b, 2).is_none());
        assert!(split(&b, 4).is_none());
    }
}
