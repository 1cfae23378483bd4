//! The router: from what the proxy knows of a client's connection and the
//! [`Class`] of its next command (as the command model,
//! [`crate::command::Commands`], judges it), what happens to that command. A pure function over values: the session
//! ([`crate::downstream::session`]) carries the [`Action`] out.

use crate::command::{Class, Local, Pin, PubSub, Refusal, SUBSCRIBED_MODE};

/// What the router needs to know of one client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientView {
    /// Authenticated to the proxy (always, without `listen.password`).
    pub authed: bool,
    /// RESP2 with subscriptions: Redis's restricted subscribed mode.
    pub resp2_subscribed: bool,
    /// Inside MULTI on its pinned connection.
    pub in_multi: bool,
    /// Inside a MULTI that could not be given a connection.
    pub doomed: bool,
    /// Holds state on a pinned connection (transaction, WATCH, database,
    /// client mode) that later commands must see.
    pub needs_pin: bool,
}

/// What to do with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `-NOAUTH`: the proxy's password comes first.
    NoAuth,
    /// RESP2 subscribed mode: `PING` is answered as Redis answers it there.
    SubscribedPing,
    /// RESP2 subscribed mode refuses it, as Redis does.
    NotWhileSubscribed,
    /// Part of a transaction whose MULTI failed: not run.
    Doomed,
    /// Inside MULTI, answered by the proxy: `+QUEUED` now, its reply put into
    /// EXEC's array when the transaction runs.
    QueueLocal(Local),
    /// Refused inside MULTI (`None`: the proxy cannot queue it): an error now,
    /// and EXEC discards the transaction, as Redis does for a command it
    /// refuses at queue time.
    RefuseInMulti(Option<&'static str>),
    /// Refused, with the reason.
    Refuse(&'static str),
    /// Answered or tracked by the proxy.
    Local(Local),
    /// Subscriptions: the pub/sub hub.
    Hub(PubSub),
    /// Needs a connection of the client's own (dialled or taken warm if it
    /// has none).
    Pin(Pin),
    /// The server refuses it before running it (see [`Class::Invalid`]):
    /// sent to the connection the client's state is on, for its own error.
    ServerRefuses,
    /// What the proxy answers as itself, refused as Redis refuses it before
    /// running it (see [`Class::Rejected`]): its error now, and inside
    /// MULTI, EXEC then discards the transaction.
    Reject(Refusal),
    /// Stateless, but the client's state lives on its pinned connection.
    Pinned,
    /// Stateless: the client's shared connection.
    Shared,
}

/// Decide what happens to a command named `name` (upper case) of `class`.
pub fn route(c: &ClientView, class: Class, name: &[u8]) -> Action {
    if c.doomed && name != b"RESET" {
        return Action::Doomed;
    }
    // Redis checks that a command exists and has the right number of
    // arguments before anything else (authentication, subscribed mode,
    // MULTI queueing).
    match class {
        Class::Invalid => return Action::ServerRefuses,
        Class::Rejected(refusal) => return Action::Reject(refusal),
        _ => {}
    }
    if !c.authed
        && !matches!(
            class,
            Class::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
        )
    {
        return Action::NoAuth;
    }
    if c.resp2_subscribed {
        if !SUBSCRIBED_MODE.contains(&name) {
            return Action::NotWhileSubscribed;
        }
        if name == b"PING" {
            return Action::SubscribedPing;
        }
    }
    if c.in_multi {
        match class {
            Class::Local(
                local @ (Local::Auth
                | Local::ClientSetName
                | Local::ClientGetName
                | Local::ClientSetInfo
                | Local::ClientId
                | Local::ClientInfo
                | Local::ClientList
                | Local::ClientKill),
            ) => return Action::QueueLocal(local),
            Class::Local(Local::ClientReply | Local::Hello | Local::ClientUnblock) => {
                return Action::RefuseInMulti(None)
            }
            Class::Refuse(why) => return Action::RefuseInMulti(Some(why)),
            _ => {}
        }
    }
    match class {
        Class::Refuse(why) => Action::Refuse(why),
        Class::Local(local) => Action::Local(local),
        Class::PubSub(cmd) => Action::Hub(cmd),
        Class::Pin(pin) => Action::Pin(pin),
        Class::Shared if c.needs_pin => Action::Pinned,
        Class::Shared => Action::Shared,
        Class::Invalid => Action::ServerRefuses,
        Class::Rejected(refusal) => Action::Reject(refusal),
    }
}

/// The error Redis gives when it refuses a command before running it
/// (`text` without the leading `-`): a refused EXEC also discards the
/// transaction, and says so.
pub fn rejection(name: &[u8], text: &str) -> String {
    if name == b"EXEC" {
        let text = text.strip_prefix("ERR ").unwrap_or(text);
        format!("EXECABORT Transaction discarded because of: {text}")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{classify, refusal};

    fn plain() -> ClientView {
        ClientView {
            authed: true,
            ..ClientView::default()
        }
    }

    fn go(c: ClientView, args: &[&[u8]]) -> Action {
        route(c, classify(args), &args[0].to_ascii_uppercase())
    }

    fn route(c: ClientView, class: Class, name: &[u8]) -> Action {
        super::route(&c, class, name)
    }

    #[test]
    fn a_plain_client() {
        let c = plain();
        assert_eq!(go(c, &[b"GET", b"k"]), Action::Shared);
        assert_eq!(go(c, &[b"MULTI"]), Action::Pin(Pin::Transaction));
        assert_eq!(go(c, &[b"WATCH", b"k"]), Action::Pin(Pin::Watch));
        assert_eq!(go(c, &[b"BLPOP", b"q", b"0"]), Action::Pin(Pin::Blocking));
        assert_eq!(go(c, &[b"MONITOR"]), Action::Pin(Pin::Monitor));
        assert_eq!(go(c, &[b"SELECT", b"0"]), Action::Local(Local::Select));
        assert_eq!(go(c, &[b"SUBSCRIBE", b"c"]), Action::Hub(PubSub::Subscribe));
        assert_eq!(go(c, &[b"SYNC"]), Action::Refuse(refusal::REPLICATION));
        assert_eq!(go(c, &[b"WAIT", b"1", b"0"]), Action::Refuse(refusal::WAIT));
        assert_eq!(
            go(c, &[b"CLIENT", b"REPLY", b"OFF"]),
            Action::Local(Local::ClientReply)
        );
        for (sub, local) in [
            (&b"LIST"[..], Local::ClientList),
            (b"KILL", Local::ClientKill),
            (b"UNBLOCK", Local::ClientUnblock),
            (b"INFO", Local::ClientInfo),
        ] {
            assert_eq!(go(c, &[b"CLIENT", sub]), Action::Local(local));
        }
    }

    #[test]
    fn state_on_a_pinned_connection_keeps_stateless_commands_there() {
        let c = ClientView {
            needs_pin: true,
            ..plain()
        };
        assert_eq!(go(c, &[b"GET", b"k"]), Action::Pinned);
        assert_eq!(go(c, &[b"BLPOP", b"q", b"0"]), Action::Pin(Pin::Blocking));
    }

    #[test]
    fn the_proxy_password_comes_first() {
        let c = ClientView::default();
        assert_eq!(go(c, &[b"GET", b"k"]), Action::NoAuth);
        assert_eq!(go(c, &[b"MULTI"]), Action::NoAuth);
        assert_eq!(go(c, &[b"SYNC"]), Action::NoAuth);
        for ok in [&b"AUTH"[..], b"HELLO", b"QUIT", b"RESET"] {
            assert!(matches!(go(c, &[ok]), Action::Local(_)), "{ok:?}");
        }
    }

    #[test]
    fn resp2_subscribed_mode() {
        let c = ClientView {
            resp2_subscribed: true,
            ..plain()
        };
        assert_eq!(go(c, &[b"GET", b"k"]), Action::NotWhileSubscribed);
        assert_eq!(go(c, &[b"PING"]), Action::SubscribedPing);
        assert_eq!(go(c, &[b"QUIT"]), Action::Local(Local::Quit));
        assert_eq!(go(c, &[b"UNSUBSCRIBE"]), Action::Hub(PubSub::Unsubscribe));
        assert_eq!(
            go(c, &[b"PSUBSCRIBE", b"p*"]),
            Action::Hub(PubSub::PSubscribe)
        );
    }

    #[test]
    fn inside_multi() {
        let c = ClientView {
            in_multi: true,
            needs_pin: true,
            ..plain()
        };
        assert_eq!(go(c, &[b"SET", b"k", b"v"]), Action::Pinned);
        assert_eq!(
            go(c, &[b"CLIENT", b"SETNAME", b"n"]),
            Action::QueueLocal(Local::ClientSetName)
        );
        assert_eq!(
            go(c, &[b"CLIENT", b"ID"]),
            Action::QueueLocal(Local::ClientId)
        );
        assert_eq!(go(c, &[b"AUTH", b"p"]), Action::QueueLocal(Local::Auth));
        assert_eq!(
            go(c, &[b"SCRIPT", b"DEBUG", b"YES"]),
            Action::RefuseInMulti(Some(refusal::SCRIPT_DEBUG))
        );
        assert_eq!(
            go(c, &[b"CLIENT", b"REPLY", b"OFF"]),
            Action::RefuseInMulti(None)
        );
        assert_eq!(go(c, &[b"HELLO", b"3"]), Action::RefuseInMulti(None));
        assert_eq!(
            go(c, &[b"CLIENT", b"LIST"]),
            Action::QueueLocal(Local::ClientList)
        );
        assert_eq!(
            go(c, &[b"CLIENT", b"UNBLOCK", b"7"]),
            Action::RefuseInMulti(None)
        );
        // EXEC, DISCARD, QUIT and RESET act at once.
        assert_eq!(go(c, &[b"EXEC"]), Action::Local(Local::TxEnd));
        assert_eq!(go(c, &[b"DISCARD"]), Action::Local(Local::TxEnd));
        assert_eq!(go(c, &[b"RESET"]), Action::Local(Local::Reset));
        // Blocking commands inside MULTI do not block: the pinned connection.
        assert_eq!(go(c, &[b"BLPOP", b"q", b"0"]), Action::Pin(Pin::Blocking));
    }

    #[test]
    fn what_the_server_refuses_comes_first() {
        for c in [
            ClientView::default(),
            ClientView {
                resp2_subscribed: true,
                in_multi: true,
                needs_pin: true,
                ..plain()
            },
        ] {
            assert_eq!(route(c, Class::Invalid, b"MULTI"), Action::ServerRefuses);
            let wrong = Class::Rejected(Refusal::WrongArity);
            assert_eq!(
                route(c, wrong, b"CLUSTER"),
                Action::Reject(Refusal::WrongArity)
            );
        }
        let doomed = ClientView {
            doomed: true,
            ..plain()
        };
        assert_eq!(route(doomed, Class::Invalid, b"GET"), Action::Doomed);
        assert_eq!(
            rejection(b"EXEC", "ERR Can't execute 'exec': no"),
            "EXECABORT Transaction discarded because of: Can't execute 'exec': no"
        );
        assert_eq!(
            rejection(b"EXEC", "NOAUTH Authentication required."),
            "EXECABORT Transaction discarded because of: NOAUTH Authentication required."
        );
        assert_eq!(rejection(b"GET", "ERR x"), "ERR x");
    }

    #[test]
    fn a_transaction_without_a_connection() {
        let c = ClientView {
            doomed: true,
            ..plain()
        };
        for cmd in [&b"SET"[..], b"EXEC", b"DISCARD", b"MULTI", b"PING", b"QUIT"] {
            assert_eq!(go(c, &[cmd]), Action::Doomed, "{cmd:?}");
        }
        assert_eq!(go(c, &[b"RESET"]), Action::Local(Local::Reset));
    }
}
