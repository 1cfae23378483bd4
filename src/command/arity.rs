//! What the server checks before it runs anything: that the command (and
//! its subcommand) exists and has the right number of arguments. Redis does
//! these checks first, before authentication, subscribed mode or MULTI
//! queueing, and a refused command changes nothing (inside MULTI it dooms
//! the transaction). The proxy asks this module before it answers or tracks
//! a command itself: one the server would refuse is sent to the server as it
//! is, so the client gets the server's own error for that server version,
//! and the proxy's view of the connection does not move.

use std::collections::{HashMap, HashSet};

/// Arity (Redis's convention: `n` exactly n words with the name, `-n` at
/// least n) and container commands, by lower-case name; a subcommand is
/// `container|sub`.
#[derive(Debug, Default, Clone)]
pub struct Arities {
    arity: HashMap<Vec<u8>, i64>,
    containers: HashSet<Vec<u8>>,
}

/// The commands the proxy answers or tracks itself, with their Redis 7
/// arities: used when the server did not list its commands.
const OWN: &[(&str, i64)] = &[
    ("multi", 1),
    ("exec", 1),
    ("discard", 1),
    ("unwatch", 1),
    ("watch", -2),
    ("reset", 1),
    ("select", 2),
    ("auth", -2),
    ("hello", -1),
    ("quit", -1),
    ("ping", -1),
    ("subscribe", -2),
    ("psubscribe", -2),
    ("ssubscribe", -2),
    ("unsubscribe", -1),
    ("punsubscribe", -1),
    ("sunsubscribe", -1),
    ("client", -2),
    ("client|id", 2),
    ("client|getname", 2),
    ("client|setname", 3),
    ("client|setinfo", 4),
    ("client|info", 2),
    ("client|list", -2),
    ("client|kill", -3),
    ("client|unblock", -3),
    ("client|reply", 3),
    ("client|tracking", -3),
    ("client|caching", 3),
    ("client|no-evict", 3),
    ("client|no-touch", 3),
];

/// Why the server would refuse a command before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownCommand,
    UnknownSubcommand,
    WrongArity,
}

impl Arities {
    /// The built-in table of the proxy's own commands.
    pub fn own() -> Arities {
        let mut a = Arities::default();
        for (name, arity) in OWN {
            a.insert(name.as_bytes(), *arity);
        }
        a.containers.insert(b"client".to_vec());
        a
    }

    /// Record one command (`name` as the server spells it: lower case,
    /// `container|sub` for a subcommand).
    pub fn insert(&mut self, name: &[u8], arity: i64) {
        let name = name.to_ascii_lowercase();
        if let Some(at) = name.iter().position(|&c| c == b'|') {
            self.containers.insert(name[..at].to_vec());
        }
        self.arity.insert(name, arity);
    }

    pub fn is_empty(&self) -> bool {
        self.arity.is_empty()
    }

    /// Whether the server would refuse `args` (`args[0]` the name) before
    /// running it, and why. With `complete`, a name the table lacks is
    /// unknown to the server; otherwise (the built-in table) it is not judged.
    /// `argc` counts every word (`args` may hold only the first ones).
    pub fn check(&self, args: &[&[u8]], argc: usize, complete: bool) -> Option<Refusal> {
        let name = args.first()?.to_ascii_lowercase();
        let arity = match (self.containers.contains(&name), args.get(1)) {
            (true, Some(sub)) => {
                let mut full = name.clone();
                full.push(b'|');
                full.extend(sub.to_ascii_lowercase());
                match self.arity.get(&full) {
                    Some(a) => *a,
                    None if complete => return Some(Refusal::UnknownSubcommand),
                    None => return None,
                }
            }
            _ => match self.arity.get(&name) {
                Some(a) => *a,
                None if complete => return Some(Refusal::UnknownCommand),
                None => return None,
            },
        };
        let argc = argc as i64;
        let fits = if arity >= 0 {
            argc == arity
        } else {
            argc >= -arity
        };
        (!fits).then_some(Refusal::WrongArity)
    }

    /// Redis's full name of a command, as its errors name it:
    /// `client|getname` for a known subcommand, else the name in lower case.
    pub fn full_name(&self, args: &[&[u8]]) -> String {
        let Some(name) = args.first() else {
            return String::new();
        };
        let name = name.to_ascii_lowercase();
        if let (true, Some(sub)) = (self.containers.contains(&name), args.get(1)) {
            let mut full = name.clone();
            full.push(b'|');
            full.extend(sub.to_ascii_lowercase());
            if self.arity.contains_key(&full) {
                return String::from_utf8_lossy(&full).into_owned();
            }
        }
        String::from_utf8_lossy(&name).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_own_commands() {
        let a = Arities::own();
        let check = |args: &[&[u8]]| a.check(args, args.len(), false);
        assert_eq!(check(&[b"MULTI"]), None);
        assert_eq!(check(&[b"multi", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"RESET", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"DISCARD", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"EXEC", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"UNWATCH", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"SELECT"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"SELECT", b"1"]), None);
        assert_eq!(check(&[b"WATCH"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"WATCH", b"a", b"b"]), None);
        assert_eq!(check(&[b"CLIENT", b"ID", b"x"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"client", b"id"]), None);
        assert_eq!(check(&[b"CLIENT"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"SUBSCRIBE"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"UNSUBSCRIBE"]), None);
        // The built-in table does not know everything: it judges nothing else.
        assert_eq!(check(&[b"GET"]), None);
        assert_eq!(check(&[b"CLIENT", b"NOSUCH"]), None);
        assert_eq!(a.full_name(&[b"CLIENT", b"GetName"]), "client|getname");
        assert_eq!(a.full_name(&[b"CLIENT", b"nosuch"]), "client");
        assert_eq!(a.full_name(&[b"GET", b"k"]), "get");
    }

    #[test]
    fn a_servers_table_is_complete() {
        let mut a = Arities::default();
        a.insert(b"get", 2);
        a.insert(b"client", -2);
        a.insert(b"client|getname", 2);
        let check = |args: &[&[u8]]| a.check(args, args.len(), true);
        assert_eq!(check(&[b"GET", b"k"]), None);
        assert_eq!(check(&[b"GET"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[b"NOSUCH"]), Some(Refusal::UnknownCommand));
        // A 7.0 server has no CLIENT SETINFO.
        assert_eq!(
            check(&[b"CLIENT", b"SETINFO", b"lib-name", b"x"]),
            Some(Refusal::UnknownSubcommand)
        );
        assert_eq!(check(&[b"CLIENT"]), Some(Refusal::WrongArity));
        assert_eq!(check(&[]), None);
        // Only the first words are kept of a long command: argc counts all.
        assert_eq!(a.check(&[b"GET"], 2, true), None);
    }
}
