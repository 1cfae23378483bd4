//! Where one command goes in a cluster, decided from its arguments alone
//! (pure; the slot map turns a slot into a node later):
//!
//! - [`Plan::Slot`]: every key in one slot -> that slot's owner.
//! - [`Plan::Any`]: no keys -> any primary (PING, INFO, PUBLISH, ...).
//! - [`Plan::Split`]: MGET, MSET, DEL, UNLINK, EXISTS, TOUCH over several
//!   slots -> one command per slot, replies merged in the client's order.
//! - [`Plan::FanOut`]: "the whole database" (DBSIZE, KEYS, SCAN, RANDOMKEY,
//!   FLUSHALL/FLUSHDB, SCRIPT LOAD|EXISTS|FLUSH, FUNCTION LOAD|DELETE|FLUSH)
//!   -> every primary, replies merged as a single Redis would answer.
//! - [`Plan::Refuse`]: other commands over several slots get Redis's
//!   `CROSSSLOT`; `CLUSTER ...` gets what a non-cluster Redis says.

use crate::keys::{self, KeyTable, Keys};
use bytes::Bytes;

/// How the replies of a split command are put back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// MGET: one array, elements in the order of the client's keys.
    Array,
    /// MSET: `+OK` when every part said so.
    Ok,
    /// DEL, UNLINK, EXISTS, TOUCH: the sum of the integers.
    Sum,
}

/// Commands sent to every primary, and how their replies merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fan {
    /// DBSIZE: sum.
    Sum,
    /// KEYS: one array of all.
    Concat,
    /// FLUSHALL, FLUSHDB, SCRIPT FLUSH, FUNCTION FLUSH/DELETE: `+OK` from all.
    AllOk,
    /// SCRIPT LOAD, FUNCTION LOAD: every node must agree; the first reply.
    Same,
    /// SCRIPT EXISTS: 1 where every node has the script.
    And,
    /// RANDOMKEY: a key from a node that has one, chosen at random.
    Random,
    /// INFO with its keyspace section: that section summed.
    Info,
    /// SCAN: one run of slots at a time, the run in the cursor.
    Scan,
}

/// One part of a split command: its own command bytes, and which of the
/// client's keys (by position among the keys) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub slot: u16,
    pub bytes: Bytes,
    pub keys: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Slot(u16),
    Any,
    Split {
        merge: Merge,
        parts: Vec<Part>,
        keys: usize,
    },
    FanOut(Fan),
    Refuse(Bytes),
}

pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// Commands split across slots, with how many arguments each key carries.
fn split_kind(name: &[u8]) -> Option<(Merge, usize)> {
    let n = name.to_ascii_uppercase();
    Some(match &n[..] {
        b"MGET" => (Merge::Array, 1),
        b"MSET" => (Merge::Ok, 2),
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => (Merge::Sum, 1),
        _ => return None,
    })
}

fn fan_kind(args: &[&[u8]]) -> Option<Fan> {
    let name = args.first()?.to_ascii_uppercase();
    let sub = args.get(1).map(|s| s.to_ascii_uppercase());
    let sub = sub.as_deref();
    Some(match (&name[..], sub) {
        (b"DBSIZE", _) => Fan::Sum,
        (b"KEYS", _) => Fan::Concat,
        (b"SCAN", _) => Fan::Scan,
        (b"RANDOMKEY", _) => Fan::Random,
        (b"INFO", _) if info_has_keyspace(&args[1..]) => Fan::Info,
        (b"FLUSHALL" | b"FLUSHDB", _) => Fan::AllOk,
        (b"SCRIPT", Some(b"LOAD")) => Fan::Same,
        (b"SCRIPT", Some(b"EXISTS")) => Fan::And,
        (b"SCRIPT", Some(b"FLUSH")) => Fan::AllOk,
        (b"FUNCTION", Some(b"LOAD")) => Fan::Same,
        (b"FUNCTION", Some(b"DELETE" | b"FLUSH")) => Fan::AllOk,
        _ => return None,
    })
}

/// Whether INFO with these sections shows `# Keyspace`.
fn info_has_keyspace(sections: &[&[u8]]) -> bool {
    sections.is_empty()
        || sections.iter().any(|s| {
            [&b"keyspace"[..], b"all", b"everything", b"default"]
                .iter()
                .any(|k| s.eq_ignore_ascii_case(k))
        })
}

/// Decide where `args` (a whole command, name first) goes.
pub fn plan(table: &KeyTable, args: &[&[u8]]) -> Plan {
    let Some(name) = args.first() else {
        return Plan::Any;
    };
    if name.eq_ignore_ascii_case(b"CLUSTER") {
        return Plan::Refuse(crate::resp::error(
            "ERR This instance has cluster support disabled",
        ));
    }
    if let Some(f) = fan_kind(args) {
        return Plan::FanOut(f);
    }
    let positions = match table.keys(args) {
        Keys::None | Keys::Unreadable => return Plan::Any,
        Keys::At(p) => p,
    };
    match keys::common_slot(args, &positions) {
        Ok(Some(s)) => Plan::Slot(s),
        Ok(None) => Plan::Any,
        Err(keys::CrossSlot) => match split_kind(name) {
            Some((merge, width)) => split(args, &positions, merge, width),
            None => Plan::Refuse(crate::resp::error(CROSSSLOT)),
        },
    }
}

/// One command per slot, keys (with their values for MSET) in client order.
fn split(args: &[&[u8]], positions: &[usize], merge: Merge, width: usize) -> Plan {
    let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, &p) in positions.iter().enumerate() {
        let s = keys::slot(args[p]);
        match slots.iter_mut().find(|(x, _)| *x == s) {
            Some((_, v)) => v.push(i),
            None => slots.push((s, vec![i])),
        }
    }
    let parts = slots
        .into_iter()
        .map(|(slot, ks)| {
            let mut part: Vec<&[u8]> = vec![args[0]];
            for &k in &ks {
                let p = positions[k];
                for w in 0..width {
                    if let Some(a) = args.get(p + w) {
                        part.push(a);
                    }
                }
            }
            Part {
                slot,
                bytes: crate::resp::command(&part),
                keys: ks,
            }
        })
        .collect();
    Plan::Split {
        merge,
        parts,
        keys: positions.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Plan {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        plan(&KeyTable::builtin(), &args)
    }

    #[test]
    fn single_slot_and_keyless() {
        assert_eq!(p("GET foo"), Plan::Slot(12182));
        assert_eq!(p("MGET {t}a {t}b"), Plan::Slot(keys::slot(b"t")));
        assert_eq!(p("EVAL s 2 {t}a {t}b"), Plan::Slot(keys::slot(b"t")));
        assert_eq!(p("EVAL s 0"), Plan::Any);
        assert_eq!(p("PING"), Plan::Any);
        assert_eq!(p("PUBLISH c m"), Plan::Any);
        assert_eq!(p("SPUBLISH foo m"), Plan::Slot(12182));
        assert_eq!(p("INFO"), Plan::FanOut(Fan::Info));
        assert_eq!(p("INFO server keyspace"), Plan::FanOut(Fan::Info));
        assert_eq!(p("INFO server"), Plan::Any);
        assert_eq!(p("XREAD STREAMS a"), Plan::Any);
    }

    #[test]
    fn cross_slot_split_or_refused() {
        let Plan::Split { merge, parts, keys } = p("MSET a 1 b 2 {a}c 3") else {
            panic!("split")
        };
        assert_eq!((merge, keys), (Merge::Ok, 3));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].keys, vec![0, 2]);
        assert_eq!(
            &parts[0].bytes[..],
            &crate::resp::command(&[b"MSET", b"a", b"1", b"{a}c", b"3"])[..]
        );
        assert_eq!(parts[1].slot, keys::slot(b"b"));
        let Plan::Split { merge, parts, .. } = p("del x y z") else {
            panic!("split")
        };
        assert_eq!(merge, Merge::Sum);
        assert_eq!(parts.len(), 3);
        assert!(matches!(
            p("MGET a b"),
            Plan::Split {
                merge: Merge::Array,
                ..
            }
        ));
        for refused in [
            "MSETNX a 1 b 2",
            "SUNION a b",
            "RENAME a b",
            "EVAL s 2 a b",
            "BLPOP a b 0",
        ] {
            assert_eq!(
                p(refused),
                Plan::Refuse(crate::resp::error(CROSSSLOT)),
                "{refused}"
            );
        }
    }

    #[test]
    fn whole_database_commands_fan_out() {
        assert_eq!(p("DBSIZE"), Plan::FanOut(Fan::Sum));
        assert_eq!(p("keys *"), Plan::FanOut(Fan::Concat));
        assert_eq!(p("SCAN 0 COUNT 10"), Plan::FanOut(Fan::Scan));
        assert_eq!(p("FLUSHALL ASYNC"), Plan::FanOut(Fan::AllOk));
        assert_eq!(p("script load x"), Plan::FanOut(Fan::Same));
        assert_eq!(p("SCRIPT EXISTS a b"), Plan::FanOut(Fan::And));
        assert_eq!(p("FUNCTION DELETE lib"), Plan::FanOut(Fan::AllOk));
        assert_eq!(p("RANDOMKEY"), Plan::FanOut(Fan::Random));
        assert_eq!(p("FUNCTION LIST"), Plan::Any);
        assert!(matches!(p("CLUSTER SLOTS"), Plan::Refuse(_)));
    }
}
