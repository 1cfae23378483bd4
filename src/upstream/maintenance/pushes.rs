//! Redis Enterprise's maintenance push frames (what `CLIENT
//! MAINT_NOTIFICATIONS ON` turns on for a RESP3 connection) and what the
//! proxy does about each. Pure: a frame in, a notice out; a tracker that
//! drops repeats (sequence numbers repeat after reconnects); an action.
//!
//! `MOVING <seq> <ttl> <host:port|null>`, `MIGRATING <seq> <ttl> ...`,
//! `MIGRATED <seq> ...`, `FAILING_OVER <seq> <ttl> ...`, `FAILED_OVER <seq> ...`,
//! `SMIGRATING <seq> <slots>`, `SMIGRATED <seq> ...`.

use std::collections::VecDeque;
use std::time::Duration;

/// The command that asks for the pushes, as client libraries send it.
pub const OPT_IN: [&[u8]; 4] = [
    b"CLIENT",
    b"MAINT_NOTIFICATIONS",
    b"ON",
    b"moving-endpoint-type",
];
/// The proxy reaches the cache by its public name.
pub const ENDPOINT_TYPE: &[u8] = b"external-fqdn";
/// How long the reply timeout is relaxed when no ttl is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);
/// Repeats remembered, per connection slot.
const REMEMBERED: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// The endpoint moves: reconnect (to `to`, `None`: the same name) within `ttl`.
    Moving {
        seq: u64,
        ttl: Duration,
        to: Option<String>,
    },
    Migrating {
        seq: u64,
        ttl: Duration,
    },
    Migrated {
        seq: u64,
    },
    FailingOver {
        seq: u64,
        ttl: Duration,
    },
    FailedOver {
        seq: u64,
    },
    SMigrating {
        seq: u64,
    },
    SMigrated {
        seq: u64,
    },
}

impl Push {
    pub fn seq(&self) -> u64 {
        match self {
            Push::Moving { seq, .. }
            | Push::Migrating { seq, .. }
            | Push::Migrated { seq }
            | Push::FailingOver { seq, .. }
            | Push::FailedOver { seq }
            | Push::SMigrating { seq }
            | Push::SMigrated { seq } => *seq,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Push::Moving { .. } => "MOVING",
            Push::Migrating { .. } => "MIGRATING",
            Push::Migrated { .. } => "MIGRATED",
            Push::FailingOver { .. } => "FAILING_OVER",
            Push::FailedOver { .. } => "FAILED_OVER",
            Push::SMigrating { .. } => "SMIGRATING",
            Push::SMigrated { .. } => "SMIGRATED",
        }
    }
}

/// Read a push frame's words (already split: kind first); `None` when it is
/// not a maintenance push (a pub/sub message, an invalidation) or malformed.
pub fn parse(words: &[&[u8]]) -> Option<Push> {
    let (kind, rest) = words.split_first()?;
    let num = |i: usize| -> Option<u64> { std::str::from_utf8(rest.get(i)?).ok()?.parse().ok() };
    let seq = num(0)?;
    let ttl = || num(1).map(Duration::from_secs).unwrap_or(DEFAULT_TTL);
    let upper = kind.to_ascii_uppercase();
    Some(match upper.as_slice() {
        b"MOVING" => Push::Moving {
            seq,
            ttl: ttl(),
            to: rest
                .get(2)
                .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case(b"null"))
                .and_then(|e| std::str::from_utf8(e).ok())
                .map(|e| e.chars().take(256).collect()),
        },
        b"MIGRATING" => Push::Migrating { seq, ttl: ttl() },
        b"MIGRATED" => Push::Migrated { seq },
        b"FAILING_OVER" => Push::FailingOver { seq, ttl: ttl() },
        b"FAILED_OVER" => Push::FailedOver { seq },
        b"SMIGRATING" => Push::SMigrating { seq },
        b"SMIGRATED" => Push::SMigrated { seq },
        _ => return None,
    })
}

/// Drops a push seen already (same kind and sequence number), across the
/// reconnects of one connection slot, remembering the last few.
#[derive(Debug, Default)]
pub struct Dedup {
    seen: VecDeque<(&'static str, u64)>,
}

impl Dedup {
    /// `true` the first time a (kind, seq) is offered.
    pub fn first(&mut self, p: &Push) -> bool {
        let key = (p.label(), p.seq());
        if self.seen.contains(&key) {
            return false;
        }
        if self.seen.len() == REMEMBERED {
            self.seen.pop_front();
        }
        self.seen.push_back(key);
        true
    }
}

/// What to do about a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replace the connection (make before break: the new one is dialled
    /// while this one finishes its replies), within `within`.
    HandOver {
        to: Option<String>,
        within: Duration,
    },
    /// The node is busy moving or failing over: allow replies this much
    /// longer before the connection counts as dead.
    Relax { ttl: Duration },
    /// The move or failover is done: the usual reply timeout again.
    Restore,
    /// Slots move between shards: the cluster map is out of date.
    RefreshSlots,
}

pub fn decide(p: &Push) -> Action {
    match p {
        Push::Moving { ttl, to, .. } => Action::HandOver {
            to: to.clone(),
            within: *ttl,
        },
        Push::Migrating { ttl, .. } | Push::FailingOver { ttl, .. } => Action::Relax { ttl: *ttl },
        Push::Migrated { .. } | Push::FailedOver { .. } => Action::Restore,
        Push::SMigrating { .. } | Push::SMigrated { .. } => Action::RefreshSlots,
    }
}

#[cfg(test)]
#[path = "pushes_tests.rs"]
mod tests;
