//! What the server checks before it runs anything: that the command (and
//! its subcommand) exists and has the right number of arguments. Redis does
//! these checks first, before authentication, subscribed mode or MULTI
//! queueing, and a refused command changes nothing (inside MULTI it dooms
//! the transaction). The proxy asks the command model
//! ([`super::Commands::refuses`]) before it answers or tracks a command
//! itself: one the server would refuse is sent to the server as it is, so
//! the client gets the server's own error for that server version, and the
//! proxy's view of the connection does not move.
//!
//! Here: the arities of the proxy's own commands (used until the server has
//! listed its own) and the rule that judges one.

/// The commands the proxy answers or tracks itself, with their Redis 7
/// arities (Redis's convention: `n` exactly n words with the name, `-n` at
/// least n; `container|sub` for a subcommand): used when the server did not
/// list its commands.
pub(super) const OWN: &[(&str, i64)] = &[
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

/// What the proxy answers as itself (`downstream::face`: the cluster face,
/// CLIENT MAINT_NOTIFICATIONS, INFO) is judged as a Redis 7.0 cluster node
/// judges it, whatever the upstream's version: these are its arities. CLUSTER
/// subcommands the face refuses are listed too (Redis checks their arity
/// first); a CLIENT subcommand the face claims is unknown to Redis 7.0.
pub(super) const FACE: &[(&str, i64)] = &[
    ("info", -1),
    ("readonly", 1),
    ("readwrite", 1),
    ("asking", 1),
    ("client", -2),
    // CLIENT has subcommands (so MAINT_NOTIFICATIONS is an unknown one).
    ("client|help", 2),
    ("cluster", -2),
    ("cluster|slots", 2),
    ("cluster|shards", 2),
    ("cluster|nodes", 2),
    ("cluster|info", 2),
    ("cluster|myid", 2),
    ("cluster|keyslot", 3),
    ("cluster|countkeysinslot", 3),
    ("cluster|getkeysinslot", 4),
    ("cluster|help", 2),
    ("cluster|addslots", -3),
    ("cluster|addslotsrange", -4),
    ("cluster|bumpepoch", 2),
    ("cluster|count-failure-reports", 3),
    ("cluster|delslots", -3),
    ("cluster|delslotsrange", -4),
    ("cluster|failover", -2),
    ("cluster|flushslots", 2),
    ("cluster|forget", 3),
    ("cluster|links", 2),
    ("cluster|meet", -4),
    ("cluster|replicas", 3),
    ("cluster|replicate", 3),
    ("cluster|reset", -2),
    ("cluster|saveconfig", 2),
    ("cluster|set-config-epoch", 3),
    ("cluster|setslot", -4),
    ("cluster|slaves", 3),
];

/// Why the server would refuse a command before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownCommand,
    UnknownSubcommand,
    WrongArity,
}

/// Whether `argc` words (the name included) fit `arity`.
pub(super) fn fits(arity: i64, argc: usize) -> bool {
    let argc = argc as i64;
    if arity >= 0 {
        argc == arity
    } else {
        argc >= -arity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_or_at_least() {
        assert!(fits(1, 1));
        assert!(!fits(1, 2));
        assert!(fits(-2, 2));
        assert!(fits(-2, 5));
        assert!(!fits(-2, 1));
        // Every subcommand's container is listed too.
        for table in [OWN, FACE] {
            for (name, _) in table {
                if let Some((container, _)) = name.split_once('|') {
                    assert!(table.iter().any(|(n, _)| *n == container), "{name}");
                }
            }
        }
    }
}
