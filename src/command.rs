//! Where each client command goes: answered by the proxy, sent over a shared
//! multiplexed connection, sent on a connection pinned to this client because
//! it creates connection state, or handled by the pub/sub hub. One table,
//! [`TABLE`], decides by command name;
//! [`classify`] adds the cases that depend on arguments (CLIENT subcommands,
//! XREAD BLOCK, SELECT of a non-default database).

mod arity;
pub use arity::{Arities, Refusal};

/// Answered or tracked by the proxy itself; never forwarded with the client's
/// arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Auth,
    Hello,
    Quit,
    Reset,
    Select,
    ClientSetName,
    ClientGetName,
    ClientSetInfo,
    ClientId,
    ClientInfo,
    /// CLIENT LIST / KILL / UNBLOCK: on the proxy's own clients (see
    /// `downstream::clients`), never on the upstream connections.
    ClientList,
    ClientKill,
    ClientUnblock,
    /// CLIENT REPLY ON|OFF|SKIP: the proxy drops the replies itself, so the
    /// upstream connection's reply matching never changes.
    ClientReply,
    /// EXEC/DISCARD/UNWATCH: only meaningful on a pinned connection.
    TxEnd,
    /// What the proxy answers as itself (`downstream::face`): the cluster
    /// face, INFO's mode, CLIENT MAINT_NOTIFICATIONS. Claimed before this
    /// table is read (the face can be turned off).
    Face,
}

/// Why the proxy refuses a command rather than run it: what it would do to a
/// connection other clients share, or an answer that would not be true of
/// this client. The text follows `ERR ` in the reply.
pub mod refusal {
    pub const REPLICATION: &str = "replication commands (SYNC, PSYNC, REPLCONF) are not supported through redis-entra-proxy: they would turn a shared upstream connection into a replica";
    pub const SCRIPT_DEBUG: &str = "SCRIPT DEBUG is not supported through redis-entra-proxy: it would put a shared upstream connection into the Lua debugger";
    pub const UNPLACED: &str = "the proxy cannot place this command: the server flags it 'pubsub' (it would change a shared connection's mode) and redis-entra-proxy's routing table does not know it";
    pub const HTTP: &str = "POST and Host: are not Redis commands (Redis closes a connection that sends them, as an HTTP request would)";
    pub const WAIT: &str = "WAIT and WAITAOF are not supported through redis-entra-proxy: the proxy multiplexes clients' writes over shared upstream connections, so the server cannot tell which writes are this client's";
}

/// Why a client needs a dedicated upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Transaction,
    Watch,
    Blocking,
    Database,
    ClientMode,
    Monitor,
    Cluster,
    /// Must not wait behind what a shared connection is running: SCRIPT
    /// KILL / FUNCTION KILL, sent while a script holds the server (and
    /// perhaps the very shared connection that ran it). A connection of its
    /// own for this command, let go right after.
    Urgent,
}

/// Subscription commands: answered by the session with the pub/sub hub's
/// help, never forwarded as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSub {
    Subscribe,
    PSubscribe,
    SSubscribe,
    Unsubscribe,
    PUnsubscribe,
    SUnsubscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Stateless: any shared connection of the client's protocol will do.
    Shared,
    /// Creates state that outlives the command: needs its own connection.
    Pin(Pin),
    Local(Local),
    /// Subscriptions, carried by the shared pub/sub hub.
    PubSub(PubSub),
    /// Not run: the reason (see [`refusal`]).
    Refuse(&'static str),
    /// The server refuses it before running it (unknown command or
    /// subcommand, wrong arity: see [`server_refuses`]): sent to the server
    /// as it is, for the server's own error, and tracked as nothing.
    Invalid,
}

/// Command name (upper case) -> class, for every command that is not plain
/// stateless. Anything not listed is [`Class::Shared`].
pub const TABLE: &[(&str, Class)] = &[
    ("AUTH", Class::Local(Local::Auth)),
    ("HELLO", Class::Local(Local::Hello)),
    ("QUIT", Class::Local(Local::Quit)),
    ("RESET", Class::Local(Local::Reset)),
    ("SELECT", Class::Local(Local::Select)),
    ("EXEC", Class::Local(Local::TxEnd)),
    ("DISCARD", Class::Local(Local::TxEnd)),
    ("UNWATCH", Class::Local(Local::TxEnd)),
    ("MULTI", Class::Pin(Pin::Transaction)),
    ("WATCH", Class::Pin(Pin::Watch)),
    ("BLPOP", Class::Pin(Pin::Blocking)),
    ("BRPOP", Class::Pin(Pin::Blocking)),
    ("BLMOVE", Class::Pin(Pin::Blocking)),
    ("BRPOPLPUSH", Class::Pin(Pin::Blocking)),
    ("BZPOPMIN", Class::Pin(Pin::Blocking)),
    ("BZPOPMAX", Class::Pin(Pin::Blocking)),
    ("BLMPOP", Class::Pin(Pin::Blocking)),
    ("BZMPOP", Class::Pin(Pin::Blocking)),
    ("WAIT", Class::Refuse(refusal::WAIT)),
    ("WAITAOF", Class::Refuse(refusal::WAIT)),
    ("SYNC", Class::Refuse(refusal::REPLICATION)),
    ("PSYNC", Class::Refuse(refusal::REPLICATION)),
    ("REPLCONF", Class::Refuse(refusal::REPLICATION)),
    ("MONITOR", Class::Pin(Pin::Monitor)),
    ("SUBSCRIBE", Class::PubSub(PubSub::Subscribe)),
    ("PSUBSCRIBE", Class::PubSub(PubSub::PSubscribe)),
    ("SSUBSCRIBE", Class::PubSub(PubSub::SSubscribe)),
    ("UNSUBSCRIBE", Class::PubSub(PubSub::Unsubscribe)),
    ("PUNSUBSCRIBE", Class::PubSub(PubSub::PUnsubscribe)),
    ("SUNSUBSCRIBE", Class::PubSub(PubSub::SUnsubscribe)),
    // Redis closes the connection that sends these: never on a shared one.
    ("POST", Class::Refuse(refusal::HTTP)),
    ("HOST:", Class::Refuse(refusal::HTTP)),
    ("READONLY", Class::Pin(Pin::Cluster)),
    ("READWRITE", Class::Pin(Pin::Cluster)),
    ("ASKING", Class::Pin(Pin::Cluster)),
];

/// CLIENT subcommands that are not plain forwards.
pub const CLIENT_TABLE: &[(&str, Class)] = &[
    ("SETNAME", Class::Local(Local::ClientSetName)),
    ("GETNAME", Class::Local(Local::ClientGetName)),
    ("SETINFO", Class::Local(Local::ClientSetInfo)),
    ("ID", Class::Local(Local::ClientId)),
    ("INFO", Class::Local(Local::ClientInfo)),
    ("LIST", Class::Local(Local::ClientList)),
    ("KILL", Class::Local(Local::ClientKill)),
    ("UNBLOCK", Class::Local(Local::ClientUnblock)),
    ("TRACKING", Class::Pin(Pin::ClientMode)),
    ("CACHING", Class::Pin(Pin::ClientMode)),
    ("REPLY", Class::Local(Local::ClientReply)),
    ("NO-EVICT", Class::Pin(Pin::ClientMode)),
    ("NO-TOUCH", Class::Pin(Pin::ClientMode)),
];

fn lookup(table: &[(&str, Class)], name: &[u8]) -> Option<Class> {
    table
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
}

/// Commands whose class depends on their arguments ([`classify`] decides).
const BY_ARGUMENTS: &[&str] = &["CLIENT", "XREAD", "XREADGROUP", "SCRIPT", "FUNCTION"];

/// Whether the routing table decides this command (by name or by arguments).
pub fn listed(name: &[u8]) -> bool {
    lookup(TABLE, name).is_some()
        || BY_ARGUMENTS
            .iter()
            .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
}

/// Classify a command from its first arguments (`args[0]` is the name).
pub fn classify(args: &[&[u8]]) -> Class {
    let Some(name) = args.first() else {
        return Class::Shared;
    };
    if name.eq_ignore_ascii_case(b"CLIENT") {
        return args
            .get(1)
            .and_then(|sub| lookup(CLIENT_TABLE, sub))
            .unwrap_or(Class::Shared);
    }
    let kill = args.get(1).is_some_and(|a| a.eq_ignore_ascii_case(b"KILL"));
    if kill && (name.eq_ignore_ascii_case(b"SCRIPT") || name.eq_ignore_ascii_case(b"FUNCTION")) {
        return Class::Pin(Pin::Urgent);
    }
    if name.eq_ignore_ascii_case(b"SCRIPT") {
        let debug = args
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"DEBUG"));
        let off = args.get(2).is_some_and(|a| a.eq_ignore_ascii_case(b"NO"));
        return if debug && !off {
            Class::Refuse(refusal::SCRIPT_DEBUG)
        } else {
            Class::Shared
        };
    }
    if name.eq_ignore_ascii_case(b"XREAD") || name.eq_ignore_ascii_case(b"XREADGROUP") {
        return if xread_block_pos(args).is_some() {
            Class::Pin(Pin::Blocking)
        } else {
            Class::Shared
        };
    }
    lookup(TABLE, name).unwrap_or(Class::Shared)
}

/// Where XREAD / XREADGROUP's `BLOCK <ms>` timeout is (the index of `<ms>`):
/// among the options before `STREAMS` only, since every argument after it is
/// a stream name or an id (a stream may be called `block`).
pub fn xread_block_pos<A: AsRef<[u8]>>(args: &[A]) -> Option<usize> {
    args.iter()
        .skip(1)
        .take_while(|a| !a.as_ref().eq_ignore_ascii_case(b"STREAMS"))
        .position(|a| a.as_ref().eq_ignore_ascii_case(b"BLOCK"))
        .map(|i| i + 2)
}

/// What the upstream's `COMMAND` reply says about commands the table does not
/// list: names (lower case) whose flags include `blocking` (module commands, or
/// commands newer than this table). Learned once, from the first upstream
/// connection; such a command is pinned like the blocking commands above.
#[derive(Debug, Default, Clone)]
pub struct Learned {
    /// Commands the server knows.
    pub known: usize,
    /// Blocking commands that [`classify`] would otherwise send to a shared
    /// connection, where they would hold up every other client on it.
    pub blocking: Vec<Vec<u8>>,
    /// Commands the server flags `pubsub` that the table does not know:
    /// on a shared connection they could put it in subscribed mode, so they
    /// are refused rather than guessed at.
    pub unplaced: Vec<Vec<u8>>,
    /// Every command's arity (and its subcommands'), as the server lists them.
    pub arities: Arities,
}

/// Whether the server would refuse `args` before running it (unknown
/// command or subcommand, wrong arity), judged by the server's own table if
/// it listed one, else by the built-in table of the proxy's own commands.
/// `argc` counts every word (`args` may hold only the first ones).
pub fn server_refuses(learned: Option<&Learned>, args: &[&[u8]], argc: usize) -> Option<Refusal> {
    match learned {
        Some(l) if !l.arities.is_empty() => l.arities.check(args, argc, true),
        _ => own_arities().check(args, argc, false),
    }
}

/// Redis's full name of a command (`client|getname`), as its errors say it.
pub fn full_name(learned: Option<&Learned>, args: &[&[u8]]) -> String {
    match learned {
        Some(l) if !l.arities.is_empty() => l.arities.full_name(args),
        _ => own_arities().full_name(args),
    }
}

fn own_arities() -> &'static Arities {
    static OWN: std::sync::OnceLock<Arities> = std::sync::OnceLock::new();
    OWN.get_or_init(Arities::own)
}

/// Commands the server flags `pubsub` that are plain requests with one reply
/// (the subscription commands themselves are in [`TABLE`]).
const STATELESS_PUBSUB: &[&str] = &["PUBLISH", "SPUBLISH", "PUBSUB"];

/// One `COMMAND` entry's arity (its second field), and its subcommands'
/// (the tenth field, Redis 7: entries of the same shape, `container|sub`).
fn learn_arity(
    arities: &mut Arities,
    fields: &[redis_protocol::resp3::types::OwnedFrame],
    text: &dyn Fn(&redis_protocol::resp3::types::OwnedFrame) -> Option<Vec<u8>>,
) {
    use redis_protocol::resp3::types::OwnedFrame as F;
    let (Some(name), Some(F::Number { data: arity, .. })) =
        (fields.first().and_then(text), fields.get(1))
    else {
        return;
    };
    arities.insert(&name, *arity);
    if let Some(F::Array { data: subs, .. }) = fields.get(9) {
        for sub in subs {
            if let F::Array { data, .. } = sub {
                learn_arity(arities, data, text);
            }
        }
    }
}

impl Learned {
    /// Learn from `COMMAND`'s reply: one array per command, name first and its
    /// flags third (an array in RESP2, a set in RESP3).
    pub fn from_command_reply(reply: &[u8]) -> Option<Learned> {
        use redis_protocol::resp3::types::OwnedFrame as F;
        let text = |f: &F| match f {
            F::BlobString { data, .. } | F::SimpleString { data, .. } => Some(data.to_vec()),
            _ => None,
        };
        let entries = match crate::resp::decode_reply(reply)? {
            F::Array { data, .. } => data,
            _ => return None,
        };
        let mut learned = Learned::default();
        for entry in &entries {
            let F::Array { data: fields, .. } = entry else {
                continue;
            };
            let Some(name) = fields.first().and_then(text) else {
                continue;
            };
            learned.known += 1;
            learn_arity(&mut learned.arities, fields, &text);
            let flags: Vec<Vec<u8>> = match fields.get(2) {
                Some(F::Array { data, .. }) => data.iter().filter_map(text).collect(),
                Some(F::Set { data, .. }) => data.iter().filter_map(text).collect(),
                _ => Vec::new(),
            };
            let flagged = |flag: &[u8]| flags.iter().any(|f| f.eq_ignore_ascii_case(flag));
            let known = listed(&name)
                || STATELESS_PUBSUB
                    .iter()
                    .any(|n| n.as_bytes().eq_ignore_ascii_case(&name));
            if known {
                continue;
            }
            if flagged(b"pubsub") {
                learned.unplaced.push(name.to_ascii_lowercase());
            } else if flagged(b"blocking") {
                learned.blocking.push(name.to_ascii_lowercase());
            }
        }
        learned.blocking.sort();
        learned.unplaced.sort();
        Some(learned)
    }

    /// The class of a command the table calls [`Class::Shared`].
    pub fn refine(&self, name: &[u8]) -> Class {
        if self.blocking.iter().any(|b| b.eq_ignore_ascii_case(name)) {
            Class::Pin(Pin::Blocking)
        } else if self.unplaced.iter().any(|b| b.eq_ignore_ascii_case(name)) {
            Class::Refuse(refusal::UNPLACED)
        } else {
            Class::Shared
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_blocking_commands_are_pinned() {
        // The shape of COMMAND's reply in RESP2 (flags an array) and RESP3 (a set).
        let resp2 = b"*3\r\n\
            *3\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n\
            *3\r\n$5\r\nblpop\r\n:-3\r\n*2\r\n+write\r\n+blocking\r\n\
            *3\r\n$11\r\nmymod.bwait\r\n:-2\r\n*2\r\n+readonly\r\n+blocking\r\n";
        let l = Learned::from_command_reply(resp2).expect("parses");
        assert_eq!(l.known, 3);
        // BLPOP is in the table already; only the module command is new.
        assert_eq!(l.blocking, vec![b"mymod.bwait".to_vec()]);
        assert_eq!(l.refine(b"MYMOD.BWAIT"), Class::Pin(Pin::Blocking));
        assert_eq!(l.refine(b"GET"), Class::Shared);
        // A module command that could change a connection's mode: refused.
        let pubsub = b"*2\r\n*3\r\n$7\r\nx.psub2\r\n:-2\r\n*2\r\n+pubsub\r\n+noscript\r\n\
            *3\r\n$7\r\npublish\r\n:3\r\n*2\r\n+pubsub\r\n+fast\r\n";
        let l = Learned::from_command_reply(pubsub).expect("parses");
        assert_eq!(l.unplaced, vec![b"x.psub2".to_vec()]);
        assert_eq!(l.refine(b"X.PSUB2"), Class::Refuse(refusal::UNPLACED));
        assert_eq!(l.refine(b"PUBLISH"), Class::Shared);
        let resp3 = b"*1\r\n*3\r\n$6\r\nx.wait\r\n:-2\r\n~1\r\n+blocking\r\n";
        let l = Learned::from_command_reply(resp3).expect("parses");
        assert_eq!(l.blocking, vec![b"x.wait".to_vec()]);
        assert!(Learned::from_command_reply(b"-NOPERM no\r\n").is_none());
        assert_eq!(Learned::default().refine(b"anything"), Class::Shared);
        // XREAD blocks only with BLOCK: the table decides it by its arguments.
        let xread = b"*1\r\n*3\r\n$5\r\nxread\r\n:-4\r\n*1\r\n+blocking\r\n";
        assert!(Learned::from_command_reply(xread)
            .unwrap()
            .blocking
            .is_empty());
    }

    #[test]
    fn arities_come_from_the_servers_table() {
        // GET, and CLIENT with one subcommand (Redis 7's tenth field).
        let reply = b"*2\r\n\
            *3\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n\
            *10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
            *1\r\n*3\r\n$14\r\nclient|getname\r\n:2\r\n*0\r\n";
        let l = Learned::from_command_reply(reply).expect("parses");
        let refuses = |args: &[&[u8]]| server_refuses(Some(&l), args, args.len());
        assert_eq!(refuses(&[b"GET", b"k"]), None);
        assert_eq!(refuses(&[b"GET"]), Some(Refusal::WrongArity));
        assert_eq!(refuses(&[b"MULTI"]), Some(Refusal::UnknownCommand));
        assert_eq!(refuses(&[b"CLIENT", b"GETNAME"]), None);
        assert_eq!(
            refuses(&[b"CLIENT", b"GETNAME", b"x"]),
            Some(Refusal::WrongArity)
        );
        assert_eq!(
            refuses(&[b"CLIENT", b"SETINFO", b"a", b"b"]),
            Some(Refusal::UnknownSubcommand)
        );
        assert_eq!(
            full_name(Some(&l), &[b"client", b"GETNAME"]),
            "client|getname"
        );
        // No table from the server: the built-in one for the proxy's own.
        assert_eq!(
            server_refuses(None, &[b"MULTI", b"x"], 2),
            Some(Refusal::WrongArity)
        );
        assert_eq!(server_refuses(None, &[b"NOSUCH"], 1), None);
    }

    #[test]
    fn every_table_entry_classifies_as_listed() {
        for (name, class) in TABLE {
            assert_eq!(classify(&[name.as_bytes()]), *class, "{name}");
            let lower = name.to_ascii_lowercase();
            assert_eq!(classify(&[lower.as_bytes()]), *class, "{lower}");
        }
        for (sub, class) in CLIENT_TABLE {
            assert_eq!(
                classify(&[b"client", sub.as_bytes()]),
                *class,
                "CLIENT {sub}"
            );
        }
    }

    #[test]
    fn argument_dependent_cases() {
        assert_eq!(classify(&[b"GET", b"k"]), Class::Shared);
        assert_eq!(classify(&[b"CLIENT", b"PAUSE", b"10"]), Class::Shared);
        assert_eq!(classify(&[b"CLIENT"]), Class::Shared);
        assert_eq!(
            classify(&[b"XREAD", b"COUNT", b"1", b"BLOCK", b"0", b"STREAMS", b"s", b"$"]),
            Class::Pin(Pin::Blocking)
        );
        assert_eq!(classify(&[b"XREAD", b"STREAMS", b"s", b"0"]), Class::Shared);
        // Regression: a stream named `block` was read as BLOCK (forever).
        assert_eq!(
            classify(&[b"XREAD", b"STREAMS", b"block", b"0"]),
            Class::Shared
        );
        assert_eq!(
            classify(&[b"XREAD", b"STREAMS", b"a", b"block", b"0", b"0"]),
            Class::Shared
        );
        assert_eq!(
            xread_block_pos(&[
                &b"XREAD"[..],
                b"COUNT",
                b"1",
                b"BLOCK",
                b"5",
                b"STREAMS",
                b"s",
                b"$"
            ]),
            Some(4)
        );
        assert_eq!(
            classify(&[b"SCRIPT", b"DEBUG", b"YES"]),
            Class::Refuse(refusal::SCRIPT_DEBUG)
        );
        assert_eq!(
            classify(&[b"script", b"debug", b"sync"]),
            Class::Refuse(refusal::SCRIPT_DEBUG)
        );
        assert_eq!(classify(&[b"SCRIPT", b"DEBUG", b"NO"]), Class::Shared);
        assert_eq!(classify(&[b"SCRIPT", b"LOAD", b"return 1"]), Class::Shared);
        assert_eq!(classify(&[b"script", b"kill"]), Class::Pin(Pin::Urgent));
        assert_eq!(classify(&[b"FUNCTION", b"KILL"]), Class::Pin(Pin::Urgent));
        assert_eq!(classify(&[b"FUNCTION", b"LIST"]), Class::Shared);
        for name in ["SYNC", "PSYNC", "REPLCONF", "WAIT", "WAITAOF"] {
            assert!(
                matches!(classify(&[name.as_bytes()]), Class::Refuse(_)),
                "{name}"
            );
        }
        assert_eq!(
            classify(&[b"xreadgroup", b"GROUP", b"g", b"c", b"block", b"10"]),
            Class::Pin(Pin::Blocking)
        );
        assert_eq!(classify(&[]), Class::Shared);
        // Publishing and introspection are plain shared commands.
        for name in ["PUBLISH", "SPUBLISH", "PUBSUB"] {
            assert_eq!(classify(&[name.as_bytes(), b"x"]), Class::Shared, "{name}");
        }
    }

    #[test]
    fn every_subscription_command_goes_to_the_hub() {
        let hub: Vec<&str> = TABLE
            .iter()
            .filter(|(_, c)| matches!(c, Class::PubSub(_)))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(
            hub,
            [
                "SUBSCRIBE",
                "PSUBSCRIBE",
                "SSUBSCRIBE",
                "UNSUBSCRIBE",
                "PUNSUBSCRIBE",
                "SUNSUBSCRIBE"
            ]
        );
        // One entry per name.
        let mut names: Vec<&str> = TABLE.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a command is listed twice");
    }
}
