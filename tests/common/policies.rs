//! Azure's built-in data access policies as ACL rules (PRODUCT.md, "Facts
//! added"), for test users on a Redis 7 server: Azure Cache for Redis runs
//! Redis 6, where every channel is allowed, so `allchannels` is added here.

/// Data Owner.
pub const OWNER: &str = "+@all allkeys allchannels";
/// Data Contributor: no `@dangerous` (INFO, CLIENT LIST/KILL/UNBLOCK, CONFIG...).
pub const CONTRIBUTOR: &str =
    "+@all -@dangerous +cluster|info +cluster|nodes +cluster|slots allkeys allchannels";
/// Data Reader: reads and connection commands only.
pub const READER: &str =
    "+@read +@connection +cluster|info +cluster|nodes +cluster|slots allkeys allchannels";
/// A custom narrow policy: strings and hashes, no scripting, no transactions,
/// no pub/sub, no COMMAND, no CLUSTER at all.
pub const NARROW: &str = "+@string +@hash +ping +hello +auth +reset allkeys";

/// (user name, rules) of every policy user the tests make; each has the
/// password [`PASSWORD`].
pub const USERS: &[(&str, &str)] = &[
    ("owner", OWNER),
    ("contributor", CONTRIBUTOR),
    ("reader", READER),
    ("narrow", NARROW),
];

pub const PASSWORD: &str = "policy-token-1";

/// `user <name> on ><password> <rules>` lines for a redis.conf.
pub fn conf_lines() -> String {
    USERS
        .iter()
        .map(|(name, rules)| format!("user {name} on >{PASSWORD} {rules}\n"))
        .collect()
}
