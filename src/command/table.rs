//! The proxy's own facts about commands, by name: how each one is routed
//! ([`Class`]: answered by the proxy, sent over a shared multiplexed
//! connection, pinned to a connection of the client's own because it creates
//! connection state, or handled by the pub/sub hub), and why some are refused.
//! One table, [`TABLE`], decides by command name; [`classify`] adds the cases
//! that depend on arguments (CLIENT subcommands, XREAD BLOCK, SCRIPT DEBUG,
//! SCRIPT/FUNCTION KILL). What the server's `COMMAND` adds is merged in by
//! [`super::Commands`].

use super::arity::Refusal;

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
    /// subcommand, wrong arity: see [`super::Commands::refuses`]): sent to the server
    /// as it is, for the server's own error, and tracked as nothing.
    Invalid,
    /// What the proxy answers as itself ([`Local::Face`]) with the wrong
    /// arity or an unknown subcommand: refused as Redis refuses it, with
    /// its error ([`super::Commands::refusal_text`]), before anything else.
    Rejected(Refusal),
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

/// Commands Redis allows in RESP2 subscribed mode (names in upper case).
pub const SUBSCRIBED_MODE: &[&[u8]] = &[
    b"SUBSCRIBE",
    b"PSUBSCRIBE",
    b"SSUBSCRIBE",
    b"UNSUBSCRIBE",
    b"PUNSUBSCRIBE",
    b"SUNSUBSCRIBE",
    b"PING",
    b"QUIT",
    b"RESET",
];

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

/// Commands the server flags `pubsub` that are plain requests with one reply
/// (the subscription commands themselves are in [`TABLE`]).
pub(super) const STATELESS_PUBSUB: &[&str] = &["PUBLISH", "SPUBLISH", "PUBSUB"];

#[cfg(test)]
mod tests {
    use super::*;

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
