//! The proxy's own client table: what `CLIENT LIST`, `CLIENT INFO`,
//! `CLIENT KILL` and `CLIENT UNBLOCK` act on. Apps see their connections to
//! the proxy, as they would see theirs to Redis, and none of them can reach
//! the upstream connections other clients share (a forwarded `CLIENT KILL
//! TYPE normal` would have closed every shared connection).
//!
//! Each session registers on start and updates its entry only when its state
//! changes (name, database, protocol, MULTI, subscriptions, a blocking wait):
//! nothing here is touched per command.

use super::Peer;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What `CLIENT LIST` shows of a client, as the session last set it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    pub name: Option<Bytes>,
    pub db: i64,
    pub resp: u8,
    pub multi: bool,
    /// Channels + patterns, and shard channels.
    pub subs: usize,
    pub shard_subs: usize,
    /// Blocked in a command on its pinned connection, which stands on this
    /// server connection (what `CLIENT UNBLOCK` is sent for).
    pub blocked_on: Option<crate::upstream::pool::ServerRef>,
}

/// `CLIENT UNBLOCK`'s wish for a blocked client, read by its session when its
/// wait ends.
pub const UNBLOCK_NONE: u8 = 0;
pub const UNBLOCK_TIMEOUT: u8 = 1;
pub const UNBLOCK_ERROR: u8 = 2;

/// One client of the proxy.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub addr: Peer,
    pub laddr: Arc<str>,
    pub since: Instant,
    /// Cancelled by `CLIENT KILL` only (a blocked wait ends on it, as it
    /// does when the client leaves; a drain lets the wait finish).
    pub kill: CancellationToken,
    /// The session's end: cancelled by `CLIENT KILL` and by the drain.
    pub stop: CancellationToken,
    pub unblock: AtomicU8,
    pub shown: Mutex<Shown>,
    /// Named as the target of another client's `CLIENT TRACKING ...
    /// REDIRECT` ([`crate::upstream::pubsub::Hub::redirect`]): the hub is
    /// told when it leaves.
    pub redirect_target: std::sync::atomic::AtomicBool,
}

impl Entry {
    pub fn update(&self, f: impl FnOnce(&mut Shown)) {
        f(&mut self.shown.lock().expect("not poisoned"));
    }

    fn shown(&self) -> Shown {
        self.shown.lock().expect("not poisoned").clone()
    }

    fn is_pubsub(&self) -> bool {
        let s = self.shown();
        s.subs + s.shard_subs > 0
    }

    /// Its `CLIENT LIST` line (Redis 7.0's fields; those about the server's
    /// own buffers are the proxy's zeros), without the newline.
    pub fn line(&self) -> String {
        let s = self.shown();
        let mut flags = String::new();
        if s.multi {
            flags.push('x');
        }
        if s.blocked_on.is_some() {
            flags.push('b');
        }
        if s.subs + s.shard_subs > 0 {
            flags.push('P');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        let name = s
            .name
            .as_ref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        format!(
            "id={} addr={} laddr={} fd=0 name={} age={} idle=0 flags={} db={} sub={} psub=0 ssub={} multi={} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd=NULL user=default redir=-1 resp={}",
            self.id,
            self.addr,
            self.laddr,
            name,
            self.since.elapsed().as_secs(),
            flags,
            s.db,
            s.subs,
            s.shard_subs,
            if s.multi { 0 } else { -1 },
            s.resp.max(2),
        )
    }
}

/// Every live client, by id.
#[derive(Debug, Default)]
pub struct Clients {
    map: Mutex<BTreeMap<u64, Arc<Entry>>>,
}

/// Removes its client from the table when the session ends.
pub struct Registration {
    clients: Arc<Clients>,
    pub entry: Arc<Entry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients
            .map
            .lock()
            .expect("not poisoned")
            .remove(&self.entry.id);
    }
}

/// A `CLIENT KILL` filter (the new form), or the old `CLIENT KILL addr`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KillFilter {
    pub id: Option<u64>,
    pub addr: Option<String>,
    pub laddr: Option<String>,
    /// `normal`, `pubsub`, `master`, `replica`/`slave`.
    pub kind: Option<String>,
    pub user: Option<String>,
    pub skipme: bool,
    pub maxage: Option<u64>,
}

impl KillFilter {
    /// Parse `CLIENT KILL`'s arguments after `KILL`; `Err` is Redis's error.
    pub fn parse(args: &[&[u8]]) -> Result<KillFilter, &'static str> {
        let mut f = KillFilter {
            skipme: true,
            ..KillFilter::default()
        };
        if args.len() == 1 {
            f.addr = Some(String::from_utf8_lossy(args[0]).into_owned());
            f.skipme = false;
            return Ok(f);
        }
        if args.is_empty() {
            return Err("ERR wrong number of arguments for 'client|kill' command");
        }
        if !args.len().is_multiple_of(2) {
            return Err("ERR syntax error");
        }
        for pair in args.chunks(2) {
            let value = String::from_utf8_lossy(pair[1]).into_owned();
            match pair[0].to_ascii_lowercase().as_slice() {
                b"id" => {
                    f.id = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|id| *id > 0)
                            .ok_or("ERR client-id should be greater than 0")?,
                    )
                }
                b"addr" => f.addr = Some(value),
                b"laddr" => f.laddr = Some(value),
                // Every client of the proxy is `default` to Redis's eyes.
                b"user" if value == "default" => f.user = Some(value),
                b"user" => return Err("ERR No such user"),
                b"type" => {
                    let t = value.to_ascii_lowercase();
                    if !matches!(
                        t.as_str(),
                        "normal" | "pubsub" | "master" | "replica" | "slave"
                    ) {
                        return Err("ERR Unknown client type");
                    }
                    f.kind = Some(t);
                }
                b"skipme" => {
                    f.skipme = match value.to_ascii_lowercase().as_str() {
                        "yes" => true,
                        "no" => false,
                        _ => return Err("ERR syntax error"),
                    }
                }
                b"maxage" => {
                    f.maxage = Some(value.parse().map_err(|_| "ERR syntax error")?);
                }
                _ => return Err("ERR syntax error"),
            }
        }
        Ok(f)
    }

    fn matches(&self, e: &Entry, me: u64) -> bool {
        if self.skipme && e.id == me {
            return false;
        }
        self.id.is_none_or(|id| id == e.id)
            && self.addr.as_ref().is_none_or(|a| *a == e.addr.to_string())
            && self.laddr.as_ref().is_none_or(|a| **a == *e.laddr)
            && self.user.as_ref().is_none_or(|u| u == "default")
            && self.maxage.is_none_or(|m| e.since.elapsed().as_secs() >= m)
            && self.kind.as_deref().is_none_or(|k| match k {
                "pubsub" => e.is_pubsub(),
                "normal" => !e.is_pubsub(),
                _ => false,
            })
    }
}

impl Clients {
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        addr: Peer,
        laddr: Arc<str>,
        kill: CancellationToken,
        stop: CancellationToken,
    ) -> Registration {
        let entry = Arc::new(Entry {
            id,
            addr,
            laddr,
            since: Instant::now(),
            kill,
            stop,
            unblock: AtomicU8::new(UNBLOCK_NONE),
            redirect_target: std::sync::atomic::AtomicBool::new(false),
            shown: Mutex::new(Shown {
                resp: 2,
                ..Shown::default()
            }),
        });
        self.map
            .lock()
            .expect("not poisoned")
            .insert(id, entry.clone());
        Registration {
            clients: self.clone(),
            entry,
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<Entry>> {
        self.map.lock().expect("not poisoned").get(&id).cloned()
    }

    /// `CLIENT LIST [TYPE t] [ID id ...]`: the lines, or Redis's error.
    pub fn list(&self, args: &[&[u8]]) -> Result<String, &'static str> {
        let mut kind: Option<String> = None;
        let mut ids: Option<Vec<u64>> = None;
        let mut i = 0;
        while i < args.len() {
            match args[i].to_ascii_lowercase().as_slice() {
                b"type" if i + 1 < args.len() => {
                    let t = String::from_utf8_lossy(args[i + 1]).to_ascii_lowercase();
                    if !matches!(
                        t.as_str(),
                        "normal" | "pubsub" | "master" | "replica" | "slave"
                    ) {
                        return Err("ERR Unknown client type");
                    }
                    kind = Some(t);
                    i += 2;
                }
                b"id" if i + 1 < args.len() => {
                    let mut v = Vec::new();
                    for a in &args[i + 1..] {
                        let id = std::str::from_utf8(a)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                            .filter(|id| *id > 0)
                            .ok_or("ERR Invalid client ID")?;
                        v.push(id);
                    }
                    ids = Some(v);
                    i = args.len();
                }
                _ => return Err("ERR syntax error"),
            }
        }
        let map = self.map.lock().expect("not poisoned");
        let mut out = String::new();
        for e in map.values() {
            if ids.as_ref().is_some_and(|ids| !ids.contains(&e.id)) {
                continue;
            }
            let keep = match kind.as_deref() {
                None => true,
                Some("pubsub") => e.is_pubsub(),
                Some("normal") => !e.is_pubsub(),
                Some(_) => false,
            };
            if keep {
                out.push_str(&e.line());
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// Close the clients `filter` matches (never `me` with SKIPME yes);
    /// how many.
    /// Wait (at most `bound`) until every client CLIENT KILL ended, other
    /// than `me`, has closed its connection: Redis closes them before the
    /// killer gets its reply, and clients that check their socket before a
    /// command (phpredis) then reconnect without an error.
    pub async fn killed_closed(&self, me: u64, bound: std::time::Duration) {
        let until = tokio::time::Instant::now() + bound;
        while tokio::time::Instant::now() < until {
            let open = self
                .map
                .lock()
                .expect("not poisoned")
                .values()
                .any(|e| e.id != me && e.kill.is_cancelled());
            if !open {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    pub fn kill(&self, filter: &KillFilter, me: u64) -> usize {
        let map = self.map.lock().expect("not poisoned");
        let mut n = 0;
        for e in map.values() {
            if filter.matches(e, me) {
                e.kill.cancel();
                e.stop.cancel();
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (Arc<Clients>, Vec<Registration>) {
        let c = Arc::new(Clients::default());
        let regs = (1..=3)
            .map(|id| {
                c.register(
                    id,
                    Peer::Tcp(format!("127.0.0.1:{}", 5000 + id).parse().unwrap()),
                    "127.0.0.1:6379".into(),
                    CancellationToken::new(),
                    CancellationToken::new(),
                )
            })
            .collect();
        (c, regs)
    }

    #[test]
    fn list_shows_each_client_with_its_state() {
        let (c, regs) = table();
        regs[1].entry.update(|s| {
            s.name = Some(Bytes::from_static(b"worker"));
            s.db = 2;
            s.multi = true;
        });
        regs[2].entry.update(|s| s.subs = 1);
        let all = c.list(&[]).unwrap();
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("id=1 addr=127.0.0.1:5001 laddr=127.0.0.1:6379 fd=0 name= age=")
        );
        assert!(lines[1].contains(" name=worker ") && lines[1].contains(" flags=x db=2 "));
        assert!(lines[1].contains(" multi=0 "));
        assert!(lines[2].contains(" flags=P ") && lines[2].contains(" sub=1 "));
        assert_eq!(c.list(&[b"TYPE", b"pubsub"]).unwrap().lines().count(), 1);
        assert_eq!(c.list(&[b"type", b"normal"]).unwrap().lines().count(), 2);
        assert_eq!(c.list(&[b"TYPE", b"master"]).unwrap(), "");
        assert_eq!(c.list(&[b"ID", b"3", b"1"]).unwrap().lines().count(), 2);
        assert_eq!(c.list(&[b"TYPE", b"bogus"]), Err("ERR Unknown client type"));
        assert_eq!(c.list(&[b"ID", b"x"]), Err("ERR Invalid client ID"));
        drop(regs);
        assert_eq!(c.list(&[]).unwrap(), "");
    }

    #[test]
    fn kill_by_filter() {
        let (c, regs) = table();
        let f = KillFilter::parse(&[b"ID", b"2"]).unwrap();
        assert_eq!(c.kill(&f, 1), 1);
        assert!(regs[1].entry.kill.is_cancelled());
        assert!(!regs[0].entry.kill.is_cancelled());
        // SKIPME yes by default: not the caller itself.
        let f = KillFilter::parse(&[b"TYPE", b"normal"]).unwrap();
        assert_eq!(c.kill(&f, 1), 2);
        assert!(!regs[0].entry.kill.is_cancelled());
        let f = KillFilter::parse(&[b"TYPE", b"normal", b"SKIPME", b"no"]).unwrap();
        assert_eq!(c.kill(&f, 1), 3);
        // The old form: one address.
        let f = KillFilter::parse(&[b"127.0.0.1:5003"]).unwrap();
        assert_eq!(c.kill(&f, 3), 1);
        assert_eq!(
            c.kill(&KillFilter::parse(&[b"ADDR", b"1.2.3.4:5"]).unwrap(), 1),
            0
        );
        assert_eq!(
            KillFilter::parse(&[b"ID", b"1", b"TYPE"]),
            Err("ERR syntax error")
        );
        assert_eq!(
            KillFilter::parse(&[b"TYPE", b"x"]),
            Err("ERR Unknown client type")
        );
        assert_eq!(KillFilter::parse(&[b"NOPE", b"x"]), Err("ERR syntax error"));
        assert_eq!(
            KillFilter::parse(&[b"ID", b"abc"]),
            Err("ERR client-id should be greater than 0")
        );
        // As Redis words them (its suite's "CLIENT KILL with illegal arguments").
        for (args, want) in [
            (
                &[][..],
                "ERR wrong number of arguments for 'client|kill' command",
            ),
            (&[&b"id"[..], b"10", b"wrong_arg"][..], "ERR syntax error"),
            (
                &[&b"id"[..], b"-1"][..],
                "ERR client-id should be greater than 0",
            ),
            (
                &[&b"id"[..], b"0"][..],
                "ERR client-id should be greater than 0",
            ),
            (
                &[&b"type"[..], b"wrong_type"][..],
                "ERR Unknown client type",
            ),
            (&[&b"user"[..], b"wrong_user"][..], "ERR No such user"),
            (&[&b"skipme"[..], b"yes_or_no"][..], "ERR syntax error"),
        ] {
            assert_eq!(KillFilter::parse(args), Err(want), "{args:?}");
        }
    }
}
