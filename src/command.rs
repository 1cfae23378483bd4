//! Where each client command goes: answered by the proxy, sent over a shared
//! multiplexed connection, sent on a connection pinned to this client because
//! it creates connection state, or handled by the pub/sub hub. One table,
//! [`TABLE`], decides by command name;
//! [`classify`] adds the cases that depend on arguments (CLIENT subcommands,
//! XREAD BLOCK, SELECT of a non-default database).

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
    /// EXEC/DISCARD/UNWATCH: only meaningful on a pinned connection.
    TxEnd,
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
    ("WAIT", Class::Pin(Pin::Blocking)),
    ("WAITAOF", Class::Pin(Pin::Blocking)),
    ("MONITOR", Class::Pin(Pin::Monitor)),
    ("SUBSCRIBE", Class::PubSub(PubSub::Subscribe)),
    ("PSUBSCRIBE", Class::PubSub(PubSub::PSubscribe)),
    ("SSUBSCRIBE", Class::PubSub(PubSub::SSubscribe)),
    ("UNSUBSCRIBE", Class::PubSub(PubSub::Unsubscribe)),
    ("PUNSUBSCRIBE", Class::PubSub(PubSub::PUnsubscribe)),
    ("SUNSUBSCRIBE", Class::PubSub(PubSub::SUnsubscribe)),
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
    ("TRACKING", Class::Pin(Pin::ClientMode)),
    ("CACHING", Class::Pin(Pin::ClientMode)),
    ("REPLY", Class::Pin(Pin::ClientMode)),
    ("NO-EVICT", Class::Pin(Pin::ClientMode)),
    ("NO-TOUCH", Class::Pin(Pin::ClientMode)),
];

fn lookup(table: &[(&str, Class)], name: &[u8]) -> Option<Class> {
    table
        .iter()
        .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
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
    if name.eq_ignore_ascii_case(b"XREAD") || name.eq_ignore_ascii_case(b"XREADGROUP") {
        let blocks = args
            .iter()
            .skip(1)
            .any(|a| a.eq_ignore_ascii_case(b"BLOCK"));
        return if blocks {
            Class::Pin(Pin::Blocking)
        } else {
            Class::Shared
        };
    }
    lookup(TABLE, name).unwrap_or(Class::Shared)
}

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
        assert_eq!(classify(&[b"CLIENT", b"LIST"]), Class::Shared);
        assert_eq!(classify(&[b"CLIENT"]), Class::Shared);
        assert_eq!(
            classify(&[b"XREAD", b"COUNT", b"1", b"BLOCK", b"0", b"STREAMS", b"s", b"$"]),
            Class::Pin(Pin::Blocking)
        );
        assert_eq!(classify(&[b"XREAD", b"STREAMS", b"s", b"0"]), Class::Shared);
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
