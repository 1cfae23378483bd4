//! [`Commands`]: everything the proxy knows of every command, in one value
//! built once per upstream from the server's `COMMAND` reply (parsed once)
//! merged with the proxy's own tables ([`super::table`], [`super::keys`],
//! [`super::arity`], [`super::cluster`]). The routers ([`crate::route`],
//! [`crate::upstream::cluster::route`]) and the session ask it how a command
//! routes, whether the server would refuse it, where its keys are, its
//! flags, and how it spreads over a cluster. Pure: no I/O.
//!
//! Until the server has listed its commands (or when it refuses `COMMAND`),
//! [`Commands::builtin`] answers: the proxy's own commands' Redis 7
//! arities, the common commands' key positions, no flags.

use super::arity::{self, Refusal};
use super::cluster::{self, Fan, Merge};
use super::keys::{self, Keys, Spec};
use super::table::{self, refusal, Class, Pin};
use redis_protocol::resp3::types::OwnedFrame as F;
use std::collections::{HashMap, HashSet};

/// A command's flags, as `COMMAND` lists them (those the proxy reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    pub const READONLY: Flags = Flags(1);
    pub const WRITE: Flags = Flags(1 << 1);
    pub const BLOCKING: Flags = Flags(1 << 2);
    pub const PUBSUB: Flags = Flags(1 << 3);
    pub const NOSCRIPT: Flags = Flags(1 << 4);
    pub const MOVABLEKEYS: Flags = Flags(1 << 5);
    pub const NO_MULTI: Flags = Flags(1 << 6);
    pub const ADMIN: Flags = Flags(1 << 7);
    pub const FAST: Flags = Flags(1 << 8);

    const NAMES: &'static [(&'static str, Flags)] = &[
        ("readonly", Flags::READONLY),
        ("write", Flags::WRITE),
        ("blocking", Flags::BLOCKING),
        ("pubsub", Flags::PUBSUB),
        ("noscript", Flags::NOSCRIPT),
        ("movablekeys", Flags::MOVABLEKEYS),
        ("no_multi", Flags::NO_MULTI),
        ("admin", Flags::ADMIN),
        ("fast", Flags::FAST),
    ];

    fn named(name: &[u8]) -> Flags {
        Flags::NAMES
            .iter()
            .find(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
            .map_or(Flags::default(), |(_, f)| *f)
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

/// What is known of one command (or `container|sub`).
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    arity: Option<i64>,
    flags: Flags,
    keys: Option<Spec>,
}

/// The command model: one per upstream, shared by every client.
#[derive(Debug, Clone)]
pub struct Commands {
    /// By lower-case name; a subcommand is `container|sub`.
    entries: HashMap<Vec<u8>, Entry>,
    /// Commands whose subcommands have arities of their own.
    containers: HashSet<Vec<u8>>,
    /// The arities are the server's: a name it lacks is unknown to it.
    complete: bool,
    /// Commands the server listed (0: built in).
    pub known: usize,
    /// Commands the server flags `blocking` that [`table::classify`] would
    /// send to a shared connection (module commands, or newer than the
    /// table), where they would hold up every other client on it: pinned.
    pub blocking: Vec<Vec<u8>>,
    /// Commands the server flags `pubsub` that the table does not know: on a
    /// shared connection they could put it in subscribed mode, so they are
    /// refused rather than guessed at.
    pub unplaced: Vec<Vec<u8>>,
}

impl Default for Commands {
    fn default() -> Self {
        Commands::builtin()
    }
}

/// One `COMMAND` entry (or subcommand entry), as read.
struct Listed {
    name: Vec<u8>,
    arity: Option<i64>,
    flags: Flags,
    keys: Option<Spec>,
}

fn text(f: &F) -> Option<Vec<u8>> {
    match f {
        F::BlobString { data, .. } | F::SimpleString { data, .. } => Some(data.to_vec()),
        _ => None,
    }
}

fn num(f: Option<&F>) -> Option<i64> {
    match f {
        Some(F::Number { data, .. }) => Some(*data),
        _ => None,
    }
}

/// One entry of `COMMAND`'s reply: name, arity, flags (an array in RESP2, a
/// set in RESP3), first key, last key, step, ACL categories, tips, key specs,
/// subcommands (Redis 7: entries of the same shape, named `container|sub`).
fn read_entry(fields: &[F], out: &mut Vec<Listed>) {
    let Some(name) = fields.first().and_then(text) else {
        return;
    };
    let name = name.to_ascii_lowercase();
    let named = |f: &F| text(f).map_or(Flags::default(), |f| Flags::named(&f));
    let flags = match fields.get(2) {
        Some(F::Array { data, .. }) => data.iter().map(named).fold(Flags::default(), |a, f| a | f),
        Some(F::Set { data, .. }) => data.iter().map(named).fold(Flags::default(), |a, f| a | f),
        _ => Flags::default(),
    };
    let keys = match (num(fields.get(3)), num(fields.get(4)), num(fields.get(5))) {
        (Some(first), Some(last), Some(step)) => Some(Spec {
            first,
            last,
            step,
            movable: flags.contains(Flags::MOVABLEKEYS)
                || keys::MOVABLE.iter().any(|m| m.as_bytes() == name),
        }),
        _ => None,
    };
    out.push(Listed {
        name,
        arity: num(fields.get(1)),
        flags,
        keys,
    });
    if let Some(F::Array { data: subs, .. }) = fields.get(9) {
        for sub in subs {
            if let F::Array { data, .. } = sub {
                read_entry(data, out);
            }
        }
    }
}

impl Commands {
    fn with_arities(arities: &[(&str, i64)], complete: bool) -> Commands {
        let mut c = Commands {
            entries: HashMap::new(),
            containers: HashSet::new(),
            complete,
            known: 0,
            blocking: Vec::new(),
            unplaced: Vec::new(),
        };
        for (name, arity) in arities {
            c.set_arity(name.as_bytes(), *arity);
        }
        c
    }

    /// The proxy's own tables only.
    pub fn builtin() -> Commands {
        let mut c = Commands::with_arities(arity::OWN, false);
        for (name, spec) in keys::BUILTIN {
            c.entry(name.as_bytes()).keys = Some(*spec);
        }
        for name in keys::MOVABLE {
            c.entry(name.as_bytes()).keys = Some(Spec {
                movable: true,
                ..Spec::new(1, 1, 1)
            });
        }
        c
    }

    /// The model for `learned` (the server's, once a connection has read
    /// it), else the built-in one.
    pub fn or_builtin(learned: Option<&Commands>) -> &Commands {
        static BUILTIN: std::sync::OnceLock<Commands> = std::sync::OnceLock::new();
        learned.unwrap_or_else(|| BUILTIN.get_or_init(Commands::builtin))
    }

    /// What the proxy answers as itself (the cluster face), as a Redis 7.0
    /// cluster node knows it: judged by this table whatever the upstream.
    pub fn face() -> &'static Commands {
        static FACE: std::sync::OnceLock<Commands> = std::sync::OnceLock::new();
        FACE.get_or_init(|| Commands::with_arities(arity::FACE, true))
    }

    fn entry(&mut self, name: &[u8]) -> &mut Entry {
        self.entries.entry(name.to_ascii_lowercase()).or_default()
    }

    fn set_arity(&mut self, name: &[u8], arity: i64) {
        if let Some(at) = name.iter().position(|&c| c == b'|') {
            self.containers.insert(name[..at].to_ascii_lowercase());
        }
        self.entry(name).arity = Some(arity);
    }

    /// The model from `COMMAND`'s reply merged with the built-in one: the
    /// server's arities replace the built-in ones (when it listed any), its
    /// key positions override the built-in ones, its flags are taken as they
    /// are. `None` when the reply is not a command table.
    pub fn from_command_reply(reply: &[u8]) -> Option<Commands> {
        let F::Array { data: entries, .. } = crate::resp::decode_reply(reply)? else {
            return None;
        };
        let listed: Vec<Vec<Listed>> = entries
            .iter()
            .filter_map(|entry| match entry {
                F::Array { data: fields, .. } => {
                    let mut out = Vec::new();
                    read_entry(fields, &mut out);
                    (!out.is_empty()).then_some(out)
                }
                _ => None,
            })
            .collect();
        let mut c = Commands::builtin();
        if listed.iter().flatten().any(|l| l.arity.is_some()) {
            // The server's table judges every command from now on.
            c.complete = true;
            c.containers.clear();
            c.entries.retain(|_, e| {
                e.arity = None;
                e.keys.is_some()
            });
        }
        for command in listed {
            c.known += 1;
            c.learn_flags(&command[0]);
            for l in command {
                if let Some(arity) = l.arity {
                    c.set_arity(&l.name, arity);
                }
                let e = c.entry(&l.name);
                e.flags = l.flags;
                if l.keys.is_some() {
                    e.keys = l.keys;
                }
            }
        }
        c.blocking.sort();
        c.unplaced.sort();
        Some(c)
    }

    /// Note a command the table does not place whose flags say it must not
    /// go to a shared connection as a plain command.
    fn learn_flags(&mut self, l: &Listed) {
        let known = table::listed(&l.name)
            || table::STATELESS_PUBSUB
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(&l.name));
        if known {
        } else if l.flags.contains(Flags::PUBSUB) {
            self.unplaced.push(l.name.clone());
        } else if l.flags.contains(Flags::BLOCKING) {
            self.blocking.push(l.name.clone());
        }
    }

    /// Whether the arities are the server's (a name it lacks is unknown).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// `container|sub` when `name` has subcommands and `args` names one.
    fn sub_name(&self, lower: &[u8], args: &[&[u8]], key_containers: bool) -> Option<Vec<u8>> {
        let container = self.containers.contains(lower)
            || (key_containers && keys::CONTAINERS.iter().any(|c| c.as_bytes() == lower));
        if !container {
            return None;
        }
        let mut full = lower.to_vec();
        full.push(b'|');
        full.extend(args.get(1)?.to_ascii_lowercase());
        Some(full)
    }

    /// Whether the server would refuse `args` (`args[0]` the name) before
    /// running it (unknown command or subcommand, wrong arity), and why;
    /// by the built-in table, only the proxy's own commands are judged.
    /// `argc` counts every word (`args` may hold only the first ones).
    pub fn refuses(&self, args: &[&[u8]], argc: usize) -> Option<Refusal> {
        let lower = args.first()?.to_ascii_lowercase();
        let arity = |name: &[u8]| self.entries.get(name).and_then(|e| e.arity);
        let found = match self.sub_name(&lower, args, false) {
            Some(full) => arity(&full).ok_or(Refusal::UnknownSubcommand),
            None => arity(&lower).ok_or(Refusal::UnknownCommand),
        };
        match found {
            Ok(a) => (!arity::fits(a, argc)).then_some(Refusal::WrongArity),
            Err(unknown) => self.complete.then_some(unknown),
        }
    }

    /// Redis's full name of a command, as its errors name it:
    /// `client|getname` for a known subcommand, else the name in lower case.
    pub fn full_name(&self, args: &[&[u8]]) -> String {
        let Some(name) = args.first() else {
            return String::new();
        };
        let lower = name.to_ascii_lowercase();
        let name = match self.sub_name(&lower, args, false) {
            Some(full) if self.entries.get(&full).is_some_and(|e| e.arity.is_some()) => full,
            _ => lower,
        };
        String::from_utf8_lossy(&name).into_owned()
    }

    /// The positions of the keys of `args` (`args[0]` is the name).
    pub fn keys(&self, args: &[&[u8]]) -> Keys {
        let Some(name) = args.first() else {
            return Keys::None;
        };
        let lower = name.to_ascii_lowercase();
        let at = |n: &[u8]| self.entries.get(n).and_then(|e| e.keys);
        let spec = match self.sub_name(&lower, args, true) {
            Some(full) => at(&full),
            None if self.is_key_container(&lower) => None,
            None => at(&lower),
        };
        match spec {
            Some(spec) => keys::positions(spec, &lower, args),
            None => Keys::None,
        }
    }

    fn is_key_container(&self, lower: &[u8]) -> bool {
        self.containers.contains(lower) || keys::CONTAINERS.iter().any(|c| c.as_bytes() == lower)
    }

    /// The server's flags for `args` (its subcommand's, if it has one);
    /// empty for a command the server did not list.
    pub fn flags(&self, args: &[&[u8]]) -> Flags {
        let Some(name) = args.first() else {
            return Flags::default();
        };
        let lower = name.to_ascii_lowercase();
        let of = |n: &[u8]| self.entries.get(n).map(|e| e.flags);
        self.sub_name(&lower, args, false)
            .and_then(|full| of(&full))
            .or_else(|| of(&lower))
            .unwrap_or_default()
    }

    /// How `args` routes: the proxy's table ([`table::classify`]), and for
    /// what it calls shared, what the server's flags add.
    pub fn class(&self, args: &[&[u8]]) -> Class {
        match table::classify(args) {
            Class::Shared if !self.blocking.is_empty() || !self.unplaced.is_empty() => {
                args.first().map_or(Class::Shared, |name| self.refine(name))
            }
            class => class,
        }
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

    /// How the session routes `args` (`argc` words in all): its
    /// [`class`](Self::class), or [`Class::Invalid`] when the server would
    /// refuse it before running it and the proxy would otherwise answer or
    /// track it itself. A plain command is left to the server, which judges
    /// it, unless `strict` (the proxy answers it itself: RESP2 subscribed
    /// mode). What the proxy refuses is never sent, whatever its arity.
    pub fn judge(&self, args: &[&[u8]], argc: usize, strict: bool) -> Class {
        let class = self.class(args);
        if matches!(class, Class::Refuse(_)) {
            return class;
        }
        let judged = class != Class::Shared || strict;
        if judged && self.refuses(args, argc).is_some() {
            return Class::Invalid;
        }
        class
    }

    /// How the session routes a command the face claims (of [`Commands::face`]):
    /// answered by the face, or [`Class::Rejected`] as Redis rejects it.
    pub fn judge_face(&self, args: &[&[u8]], argc: usize) -> Class {
        match self.refuses(args, argc) {
            Some(refusal) => Class::Rejected(refusal),
            None => Class::Local(table::Local::Face),
        }
    }

    /// Redis's own error (without the leading `-`) for `args`, which it
    /// refuses before running them: its words, names cut at 128 bytes.
    pub fn refusal_text(&self, refusal: Refusal, args: &[&[u8]]) -> String {
        let cut = |a: &[u8], n: usize| String::from_utf8_lossy(&a[..a.len().min(n)]).into_owned();
        let name = args.first().copied().unwrap_or_default();
        match refusal {
            Refusal::WrongArity => format!(
                "ERR wrong number of arguments for '{}' command",
                self.full_name(args)
            ),
            Refusal::UnknownSubcommand => format!(
                "ERR unknown subcommand '{}'. Try {} HELP.",
                cut(args.get(1).copied().unwrap_or_default(), 128),
                String::from_utf8_lossy(name).to_uppercase()
            ),
            Refusal::UnknownCommand => {
                let mut rest = String::new();
                for a in args.iter().skip(1) {
                    if rest.len() >= 128 {
                        break;
                    }
                    rest += &format!("'{}' ", cut(a, 128 - rest.len()));
                }
                format!(
                    "ERR unknown command '{}', with args beginning with: {rest}",
                    cut(name, 128)
                )
            }
        }
    }

    /// How a command over several slots is split per slot (MGET, MSET,
    /// DEL...), and how many arguments each key carries.
    pub fn split(&self, name: &[u8]) -> Option<(Merge, usize)> {
        cluster::split_kind(name)
    }

    /// Whether `args` goes to every primary of a cluster, and how the
    /// replies merge.
    pub fn fan(&self, args: &[&[u8]]) -> Option<Fan> {
        cluster::fan_kind(args)
    }
}

#[cfg(test)]
mod tests;
